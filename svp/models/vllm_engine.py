"""The sampler's vLLM engine (GPU): vLLM's ``AsyncLLM`` in-process behind :class:`ContinuousSamplingEngine`.

What it keeps identical to :class:`svp.models.engine.TransformersEngine`:

- **Prompts.** :class:`svp.models.loading.VLMPrompter` renders the same Appendix F messages with
  the same chat template; the engine hands vLLM the token ids with the image placeholder not yet
  expanded, and vLLM's processor for the architecture expands it (to the number of image tokens
  the Hugging Face processor gives: checked on a GPU by ``tests/gpu/test_vllm_engine.py``).
- **Log-probs.** ``logprobs_mode="raw_logprobs"``: the log-softmax of the model's logits before
  the logit bias, temperature and top-p — the chosen token's value equals a teacher-forced
  recomputation, as the transformers engine's does. ``top_logprobs`` are the top of that same
  distribution.
- **Suppressed tokens** (the image placeholder, ids past the tokenizer, a pad token that is not a
  stop token) get a ``-inf`` logit bias: never generated, still counted in the raw distribution.
- **Stops.** The prompter's stop tokens end a sample and are not part of it.

What vLLM does instead of our machinery: continuous batching of all in-flight requests (the
service awaits each job directly; no micro-batcher), per-request seeds (sample ``i`` of a job
with seed ``s`` uses ``s + i``), and LoRA adapters loaded by name at run time
(``LoRARequest``; vLLM loads an adapter's weights on its first request). vLLM applies LoRA to the
language model's linear layers of LLaVA, LLaVA-NeXT, LLaVA-OneVision and Qwen2-VL; an adapter
that also trains the projector (``modules_to_save``, the trainer's ``train_projector``) cannot be
served that way: train it with ``merge: true`` (the trainer writes the merged full model to
``merged/<name>/``) and serve that checkpoint as the model instead.

vLLM is an optional dependency (``pip install -e '.[gpu]'`` on a CUDA machine): this module
imports it only when an engine is created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svp.contract import FinishReason
from svp.models.engine import ContinuousSamplingEngine, GeneratedSample, GenerationJob
from svp.models.loading import InvalidInputError, VLMPrompter, adapter_path, load_prompter

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
"""The contract's largest ``top_logprobs`` (vLLM refuses more than its ``max_logprobs``)."""


VISION_MODULES = ("vision_tower", "multi_modal_projector", "visual.")
"""Parameter-name parts of the vision side of the supported VLMs (vLLM's LoRA adapts the language model)."""


class UnsupportedAdapterError(InvalidInputError):
    """An adapter vLLM's runtime LoRA cannot apply (it trains more than the language model)."""


@dataclass(frozen=True)
class VLLMOptions:
    """vLLM engine arguments the sampler exposes (``SVP_SAMPLER_VLLM_*``)."""

    dtype: str = "auto"
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    max_lora_rank: int = 64
    max_loras: int = 4
    enforce_eager: bool = False
    """Skip CUDA graph capture (faster start, slower decoding)."""
    attention_backend: str | None = None
    """vLLM's attention backend name (e.g. ``TRITON_ATTN``); None: vLLM's choice for the GPU."""
    mm_encoder_attention_backend: str | None = None
    """The vision encoder's attention backend (e.g. ``TORCH_SDPA``); None: vLLM's choice."""
    seed: int = 0


_MERGE_INSTEAD = ("train it with merge=true and serve the merged model (<artifact_root>/merged/<name>), "
                  "or use SVP_SAMPLER_ENGINE=transformers")


def lora_servable(path: Path) -> None:
    """Raise :class:`UnsupportedAdapterError` unless vLLM can serve the PEFT adapter at ``path``
    as runtime LoRA: LoRA matrices on the language model only (the trainer's adapters without
    ``train_projector``)."""
    from safetensors import safe_open

    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError(f"adapter {path.name!r} is {config['peft_type']}, not LoRA")
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"adapter {path.name!r} also trains {config['modules_to_save']} whole (modules_to_save), which "
            f"vLLM's runtime LoRA cannot apply: {_MERGE_INSTEAD}"
        )
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            outside = sorted({k.split(".lora_")[0] for k in f.keys() if any(p in k for p in VISION_MODULES)})
        if outside:
            raise UnsupportedAdapterError(
                f"adapter {path.name!r} adapts the vision side ({outside[0]}, ...), where vLLM applies no LoRA: "
                + _MERGE_INSTEAD
            )


# transformers 5 saves a LLaVA's CLIP tower without its ``vision_model`` level
# (``vision_tower.encoder.*``); vLLM loads the names the Hub's checkpoints have
# (``vision_tower.vision_model.encoder.*``).
_FLAT_TOWER = re.compile(r"^((?:model\.)?vision_tower\.)(embeddings|encoder|pre_layrnorm|post_layernorm)\.")


def vllm_checkpoint(model: str, cache_root: Path | None = None) -> str:
    """``model``, or — for a local checkpoint saved by transformers 5 (ours: ShapesWorld, the tiny
    models, merged adapters) — a copy under ``cache_root`` whose vision-tower weights carry the
    names vLLM loads. The other files are linked, not copied."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(model)
    shards = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not shards:
        return model  # a Hub id: the Hub's LLaVA checkpoints keep the nested names
    with safe_open(str(shards[0]), framework="pt") as f:
        if not any(_FLAT_TOWER.match(k) for k in f.keys()):
            return model
    stamp = hashlib.sha1(repr([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]).encode())
    root = cache_root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "svp" / "vllm-checkpoints"
    out = root / f"{path.name}-{stamp.hexdigest()[:12]}"
    if not (out / "done").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for item in path.iterdir():
            if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json" and item.is_file():
                (out / item.name).unlink(missing_ok=True)
                (out / item.name).symlink_to(item.resolve())
        for shard in shards:
            save_file({_FLAT_TOWER.sub(r"\1vision_model.\2.", k): v for k, v in load_file(str(shard)).items()},
                      str(out / shard.name), metadata={"format": "pt"})
        index = path / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {_FLAT_TOWER.sub(r"\1vision_model.\2.", k): v for k, v in data["weight_map"].items()}
            (out / index.name).write_text(json.dumps(data))
        (out / "done").touch()
        log.info("wrote %s: %s with its vision-tower weights named as vLLM loads them", out, model)
    return str(out)


class VLLMEngine(ContinuousSamplingEngine):
    """Samples from vLLM's ``AsyncLLM`` (see the module docstring). Create it with :meth:`create`."""

    def __init__(self, prompter: VLMPrompter, llm: Any):
        self._prompter = prompter
        self.llm = llm
        self._stop_ids = sorted(prompter.stop_token_ids)
        self._bias = dict.fromkeys(sorted(prompter.suppressed_token_ids), -math.inf)
        self._adapters: dict[str, Path] = {}
        self._lora: dict[str, LoRARequest] = {}

    @classmethod
    def create(cls, model: str, options: VLLMOptions, served_model_name: str | None = None) -> VLLMEngine:
        """Load ``model`` (Hugging Face id or local path) into a new in-process ``AsyncLLM``."""
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise RuntimeError(
                "SVP_SAMPLER_ENGINE=vllm needs vLLM: pip install -e '.[gpu]' on a CUDA machine"
            ) from exc
        prompter = load_prompter(model)  # checks the architecture before vLLM spends a minute loading
        # vLLM's engine core is a child process: forked after this process touched CUDA, it could
        # not use the GPU ("Cannot re-initialize CUDA in forked subprocess").
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        args = AsyncEngineArgs(
            model=vllm_checkpoint(model),
            tokenizer=model,
            served_model_name=served_model_name or model,
            dtype=options.dtype,
            seed=options.seed,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=options.max_model_len,
            enable_lora=True,
            max_lora_rank=options.max_lora_rank,
            max_loras=options.max_loras,
            # vLLM's LoRA kernels take float16/bfloat16 adapter weights only (a float32 adapter
            # stopped the engine core on an H200): a float32 model gets bfloat16 LoRA weights.
            lora_dtype="bfloat16" if options.dtype == "float32" else "auto",
            enforce_eager=options.enforce_eager,
            attention_backend=options.attention_backend,
            mm_encoder_attn_backend=options.mm_encoder_attention_backend,
            logprobs_mode="raw_logprobs",
            max_logprobs=MAX_TOP_LOGPROBS,
            limit_mm_per_prompt={"image": 1},
        )
        return cls(prompter, AsyncLLM.from_engine_args(args))

    def shutdown(self) -> None:
        self.llm.shutdown()

    # ------------------------------------------------------------ ModelEngine

    @property
    def prompter(self) -> VLMPrompter:
        return self._prompter

    @property
    def adapters(self) -> dict[str, Path]:
        return dict(self._adapters)

    def load_adapter(self, name: str, artifact_root: Path) -> Path:
        """Register ``<artifact_root>/adapters/<name>``; vLLM loads its weights on its first request."""
        from vllm.lora.request import LoRARequest

        if name in self._adapters:
            return self._adapters[name]
        path = adapter_path(name, artifact_root)
        lora_servable(path)
        self._lora[name] = LoRARequest(lora_name=name, lora_int_id=len(self._lora) + 1, lora_path=str(path))
        self._adapters[name] = path
        log.info("registered adapter %s from %s", name, path)
        return path

    # ------------------------------------------------------------ sampling

    async def generate_async(self, job: GenerationJob) -> list[GeneratedSample]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if job.adapter is not None and job.adapter not in self._lora:
            raise InvalidInputError(f"adapter {job.adapter!r} is not loaded")
        params = SamplingParams(
            n=job.n,
            temperature=job.temperature,
            top_p=job.top_p if job.temperature > 0 else 1.0,
            seed=job.seed,
            max_tokens=job.max_new_tokens,
            logprobs=job.top_logprobs,
            stop_token_ids=self._stop_ids,
            logit_bias=self._bias,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        prompt = {
            "prompt_token_ids": self.prompter.prompt_token_ids(job.prompt_kind, job.context),
            "multi_modal_data": {"image": job.image.convert("RGB")},
        }
        final = None
        async for output in self.llm.generate(prompt, params, request_id=uuid.uuid4().hex,
                                              lora_request=self._lora.get(job.adapter or "")):
            final = output
        if final is None:
            raise RuntimeError("vLLM returned no output")
        return [self._sample(c, job.top_logprobs) for c in sorted(final.outputs, key=lambda c: c.index)]

    def _sample(self, completion: CompletionOutput, top_k: int) -> GeneratedSample:
        token_ids = list(completion.token_ids)
        steps = list(completion.logprobs or [])
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a sample with {completion.finish_reason!r}")
        finish: FinishReason = completion.finish_reason
        if finish == "stop" and token_ids and token_ids[-1] in self._stop_ids:
            token_ids, steps = token_ids[:-1], steps[:-1]
        top = None
        if top_k:
            top = [[(t, lp.logprob) for t, lp in sorted(step.items(), key=lambda kv: kv[1].rank) if lp.rank <= top_k]
                   for step in steps]
        return GeneratedSample(
            token_ids=token_ids,
            text=self.prompter.decode(token_ids),
            logprobs=[step[t].logprob for t, step in zip(token_ids, steps, strict=True)],
            top_logprobs=top,
            finish_reason=finish,
        )
