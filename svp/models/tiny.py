"""Random-initialised VLMs of the real architectures, saved like real checkpoints.

Tests (and the ShapesWorld base model, which trains one of these from scratch) load them with
``from_pretrained`` on a local path through exactly the code that loads a Hugging Face
checkpoint. The image processors are the PIL ones (``*ImageProcessorPil``): transformers' default
image processors need torchvision, which this project does not install.

Qwen2-VL is not built (nor loaded by :func:`svp.models.loading.load_vlm`): its processor always
brings a video processor that imports torchvision, and its multimodal rotary positions (M-RoPE)
need position ids the engine's shared-prefill decoding does not compute. LLaVA-OneVision-style
ChatML prompts are covered by the ``qwen_1_5`` chat format on a LLaVA architecture.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from svp.models.tokenizer import IMAGE, build_word_tokenizer, default_vocabulary
from svp.prompts import CHAT_TEMPLATES

log = logging.getLogger(__name__)

TinyArch = Literal["llava", "llava_next"]
TINY_ARCHS: tuple[str, ...] = ("llava", "llava_next")


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a built VLM; every field can be overridden by name through ``build_tiny_vlm``."""

    image_size: int = 32
    """Side of the square the vision tower sees (and of each LLaVA-NeXT tile)."""
    patch_size: int = 8
    """Vision patch side; ``(image_size / patch_size)**2`` image tokens per tile."""
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_layers: int = 2
    """At least 2: LLaVA takes the features of the second-to-last vision layer."""
    vision_heads: int = 4
    hidden_size: int = 64
    """Language model width."""
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096
    grid_pinpoints: list[list[int]] | None = None
    """LLaVA-NeXT only: the any-resolution canvases (multiples of ``image_size``); default 1x2, 2x1 and 2x2 tiles."""

    def pinpoints(self) -> list[list[int]]:
        s = self.image_size
        return self.grid_pinpoints if self.grid_pinpoints is not None else [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def _vision_config(s: TinySizes) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=s.vision_hidden_size,
        intermediate_size=s.vision_intermediate_size,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
        projection_dim=s.vision_hidden_size,
    )


def _text_config(s: TinySizes, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=s.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_vlm(
    out_dir: str | Path,
    arch: str = "llava",
    chat_format: str = "llava_v1",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    vision_feature_select_strategy: str = "default",
    **size_overrides: object,
) -> Path:
    """Save a random-initialised ``arch`` VLM with its processor and chat template to ``out_dir``.

    ``tokenizer`` defaults to :func:`build_word_tokenizer` over :func:`default_vocabulary`; a given
    tokenizer must have ``<image>`` as a single token and gets ``chat_format``'s template.
    ``vision_feature_select_strategy`` is LLaVA's: ``"default"`` drops CLIP's CLS token, ``"full"``
    gives it to the decoder as one more image token.
    ``size_overrides`` are :class:`TinySizes` fields (unknown names raise ``TypeError``). The same
    ``seed`` and arguments always give the same weights. Returns ``out_dir``.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    if chat_format not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat format {chat_format!r}; known: {', '.join(CHAT_TEMPLATES)}")
    sizes = dataclasses.replace(TinySizes(), **size_overrides)  # type: ignore[arg-type]
    if sizes.image_size % sizes.patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    if vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {vision_feature_select_strategy!r}")
    image_seq_length = (sizes.image_size // sizes.patch_size) ** 2 + (vision_feature_select_strategy == "full")
    tokenizer = tokenizer if tokenizer is not None else build_word_tokenizer(default_vocabulary(), chat_format)
    image_ids = tokenizer.encode(IMAGE, add_special_tokens=False)
    if len(image_ids) != 1 or image_ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer must encode {IMAGE!r} as one known token, got {image_ids}")
    tokenizer.chat_template = CHAT_TEMPLATES[chat_format]
    image_token_id = image_ids[0]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_kwargs: dict[str, Any] = dict(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
    )
    common: dict[str, Any] = dict(
        vision_config=_vision_config(sizes),
        text_config=_text_config(sizes, tokenizer),
        image_token_id=image_token_id,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    if arch == "llava":
        model: Any = LlavaForConditionalGeneration(
            LlavaConfig(**common, image_seq_length=image_seq_length)
        )
        processor: LlavaProcessor | LlavaNextProcessor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(**image_kwargs),
            tokenizer=tokenizer,
            patch_size=sizes.patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=CHAT_TEMPLATES[chat_format],
            image_token=IMAGE,
            num_additional_image_tokens=1,  # CLIP's CLS token; the "default" strategy drops it
        )
    else:
        model = LlavaNextForConditionalGeneration(
            LlavaNextConfig(
                **common,
                image_grid_pinpoints=sizes.pinpoints(),
                image_seq_length=image_seq_length,
            )
        )
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(**image_kwargs, image_grid_pinpoints=sizes.pinpoints()),
            tokenizer=tokenizer,
            patch_size=sizes.patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=CHAT_TEMPLATES[chat_format],
            image_token=IMAGE,
            num_additional_image_tokens=1,
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("saved tiny %s (%s, %d parameters) to %s", arch, chat_format, n_params, out)
    return out
