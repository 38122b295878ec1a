"""Sampler settings, from ``SVP_SAMPLER_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from svp.models.serving import VLMServiceSettings
from svp.models.vllm_engine import VLLMOptions


class Settings(VLMServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SVP_SAMPLER_")

    engine: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="Generation engine: 'transformers' runs anywhere and micro-batches requests; 'vllm' "
        "(CUDA, pip install -e '.[gpu]') batches continuously and loads LoRA adapters at run time.",
    )
    max_n: int = Field(default=64, ge=1, le=64, description="Most samples one request may ask for.")
    max_new_tokens: int = Field(default=1024, ge=1, le=2048, description="Most new tokens one request may ask for.")
    vllm_gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0,
                                               description="vLLM: share of GPU memory for weights and KV cache.")
    vllm_max_model_len: int | None = Field(default=None, ge=1, description="vLLM: context length (None: the model's).")
    vllm_max_lora_rank: int = Field(default=64, ge=1, le=512, description="vLLM: largest LoRA rank served.")
    vllm_max_loras: int = Field(default=4, ge=1, le=64, description="vLLM: adapters in one batch.")
    vllm_enforce_eager: bool = Field(default=False, description="vLLM: no CUDA graphs (faster start, slower decoding).")
    vllm_attention_backend: str | None = Field(default=None,
                                               description="vLLM attention backend (e.g. TRITON_ATTN); None: vLLM's choice.")
    vllm_mm_encoder_attention_backend: str | None = Field(
        default=None, description="vLLM vision-encoder attention backend (e.g. TORCH_SDPA); None: vLLM's choice.")

    def vllm_options(self) -> VLLMOptions:
        return VLLMOptions(
            dtype="bfloat16" if self.dtype == "auto" else self.dtype,  # as the transformers engine on CUDA
            gpu_memory_utilization=self.vllm_gpu_memory_utilization,
            max_model_len=self.vllm_max_model_len,
            max_lora_rank=self.vllm_max_lora_rank,
            max_loras=self.vllm_max_loras,
            enforce_eager=self.vllm_enforce_eager,
            attention_backend=self.vllm_attention_backend,
            mm_encoder_attention_backend=self.vllm_mm_encoder_attention_backend,
        )
