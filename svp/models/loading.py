"""Load a VLM (Hugging Face id or local path) with its processor, render SVP prompts, build inputs.

One :class:`LoadedVLM` is what the sampler, the scorer (and anything else that runs the model)
hold: the model, its processor, its chat format, and the PEFT LoRA adapters loaded on top of it.

Prompts: messages come from :func:`svp.prompts.build_messages` and are rendered with the
processor's own chat template (the checkpoint's for real models, one of
:data:`svp.prompts.CHAT_TEMPLATES` for the models this project builds). Some real templates
refuse a ``system`` message (they raise); for those the system text is folded into the user turn,
ahead of the user's text, separated by a blank line — the same thing the ``mistral_instruct``
template does itself.

Inputs: a prompt is tokenised by the processor (which expands ``<image>`` to the model's number
of image tokens). Rows with different prompts and continuations are collated with the prompts
left-padded to a common end column and the continuations right-padded after it, so the logits
that predict every continuation token sit in the last columns for all rows (``logits_to_keep``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    GenerationConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from svp.contract import ADAPTER_NAME_PATTERN, PromptKind
from svp.prompts import CHAT_TEMPLATES, build_messages

log = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, Any] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
}
"""Supported ``config.model_type`` values and the class that loads each."""

# Chat format recorded for a checkpoint whose template is its own rather than one of ours.
CHECKPOINT_CHAT_FORMAT = "checkpoint"

ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(LookupError):
    """The model id/path does not resolve to a loadable checkpoint."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this project runs."""


class InvalidInputError(ValueError):
    """A request's inputs are malformed: the one engine error a service answers with 400. Any
    other exception inside an engine is a server fault (500, retried by the caller)."""


class AdapterNotFoundError(LookupError):
    """No PEFT adapter of that name under ``<artifact_root>/adapters``."""

    def __init__(self, name: str, detail: str):
        super().__init__(f"adapter {name!r} not found: {detail}")
        self.name = name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``"auto"`` is bfloat16 on CUDA and float32 elsewhere; otherwise one of :data:`DTYPES`."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def detect_chat_format(chat_template: str | None) -> str:
    """The name of our template when the processor carries one of ours, else ``"checkpoint"``."""
    for name, template in CHAT_TEMPLATES.items():
        if chat_template == template:
            return name
    return CHECKPOINT_CHAT_FORMAT


@dataclass
class PromptInputs:
    """One tokenised prompt with its image: ``input_ids`` is 1-D; ``vision`` tensors have batch 1."""

    input_ids: torch.Tensor
    vision: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class CollatedBatch:
    """Rows of prompt + suffix, prompts left-padded to end at column ``prompt_end``, suffixes right-padded.

    ``suffix_mask[r, t]`` is 1 where row ``r`` has a real suffix token ``t``. The logits at columns
    ``prompt_end - 1 + t`` predict suffix token ``t``.
    """

    model_inputs: dict[str, torch.Tensor]
    prompt_end: int
    suffix_ids: torch.Tensor  # [rows, T]
    suffix_mask: torch.Tensor  # [rows, T]


def _stack_vision(prompts: Sequence[PromptInputs]) -> dict[str, torch.Tensor]:
    """Concatenate per-prompt vision tensors; LLaVA-NeXT tile stacks of different lengths are zero-padded
    (as its image processor pads a batch; ``image_sizes`` tells the model which tiles are real)."""
    keys = prompts[0].vision.keys()
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [p.vision[key] for p in prompts]
        if tensors[0].dim() == 5:  # [1, tiles, C, H, W]
            tiles = max(t.shape[1] for t in tensors)
            tensors = [
                torch.cat([t, t.new_zeros(1, tiles - t.shape[1], *t.shape[2:])], dim=1) if t.shape[1] < tiles else t
                for t in tensors
            ]
        out[key] = torch.cat(tensors, dim=0)
    return out


@dataclass
class Prefilled:
    """Prompts run through the model, one row per sample/continuation: the KV cache, the logits that
    predict each row's first new token, the attention mask so far and the next position id."""

    cache: Any
    next_logits: torch.Tensor  # [rows, vocab]
    attention_mask: torch.Tensor  # [rows, prompt_end]
    next_position: torch.Tensor  # [rows]


@dataclass
class VLMPrompter:
    """What it takes to prompt a VLM without its weights: processor, config, chat format. The vLLM
    engine renders prompts with it exactly as the transformers engine does (which holds one as
    part of its :class:`LoadedVLM`)."""

    name: str
    processor: Any
    config: Any
    """The checkpoint's ``PretrainedConfig``."""
    generation_config: Any
    """Its ``GenerationConfig`` (as the model would use it)."""
    chat_format: str
    fold_system: bool = False
    """The chat template refuses a system message: its text goes into the user turn."""

    # ------------------------------------------------------------ vocabulary

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def vocab_size(self) -> int:
        """Size of the model's output distribution (may exceed the tokenizer's length)."""
        return int(self.config.get_text_config().vocab_size)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @property
    def stop_token_ids(self) -> set[int]:
        """Tokens that end an answer: the tokenizer's EOS, the generation config's, ChatML's end of turn."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(self.generation_config, "eos_token_id", None)
        if gen_eos is not None:
            ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]))
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return ids

    @property
    def suppressed_token_ids(self) -> set[int]:
        """Ids never generated: the image placeholder, ids past the tokenizer (padding rows of the
        embedding), and the pad token unless it is also a stop token."""
        suppressed = {self.image_token_id, *range(len(self.tokenizer), self.vocab_size)}
        if self.pad_token_id not in self.stop_token_ids:
            suppressed.add(self.pad_token_id)
        return suppressed

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True)).strip()

    # ------------------------------------------------------------ prompts

    def messages(self, kind: PromptKind, context: str = "", answer: str | None = None) -> list[dict[str, Any]]:
        """SVP messages for ``kind``; the system text is folded into the user turn when the template needs it."""
        messages = build_messages(kind, context, answer=answer)
        if not self.fold_system:
            return messages
        system_text = messages[0]["content"][0]["text"]
        user = messages[1]
        parts = [dict(p) for p in user["content"]]
        for part in parts:
            if part["type"] == "text":
                part["text"] = f"{system_text}\n\n{part['text']}"
                break
        return [{"role": "user", "content": parts}, *messages[2:]]

    def render_prompt(self, kind: PromptKind, context: str = "") -> str:
        """The prompt text (with the generation prompt) that precedes the answer, image placeholder unexpanded."""
        return str(
            self.processor.apply_chat_template(self.messages(kind, context), add_generation_prompt=True, tokenize=False)
        )

    def adds_special_tokens(self, text: str) -> bool:
        """Whether tokenising ``text`` adds BOS: not when the template wrote one (as the processor's
        own apply_chat_template does, so there is never a second BOS)."""
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    def prompt_token_ids(self, kind: PromptKind, context: str = "") -> list[int]:
        """The rendered prompt's token ids with the image placeholder NOT expanded (one token per
        image): what an engine that expands placeholders itself (vLLM) takes."""
        text = self.render_prompt(kind, context)
        return list(self.tokenizer(text, add_special_tokens=self.adds_special_tokens(text))["input_ids"])


@dataclass(kw_only=True)
class LoadedVLM(VLMPrompter):
    """A loaded VLM and everything needed to prompt it. Not thread-safe: use it from one thread."""

    model: Any  # a PreTrainedModel, or a peft.PeftModel around it once an adapter is loaded
    device: torch.device
    dtype: torch.dtype
    adapters: dict[str, Path] = field(default_factory=dict)

    def prompt_inputs(self, image: Image.Image, kind: PromptKind, context: str = "") -> PromptInputs:
        """Tokenise the rendered prompt with ``image``: the processor expands the image placeholder."""
        return self.text_inputs(image, self.render_prompt(kind, context))

    def text_inputs(self, image: Image.Image, text: str) -> PromptInputs:
        """Tokenise an already rendered chat ``text`` with ``image`` (any conversation, e.g. a probe question)."""
        encoded = self.processor(images=image, text=text, return_tensors="pt",
                                 add_special_tokens=self.adds_special_tokens(text))
        vision = {
            k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
            for k, v in encoded.items()
            if k not in ("input_ids", "attention_mask")
        }
        return PromptInputs(input_ids=encoded["input_ids"][0].to(self.device), vision=vision)

    # ------------------------------------------------------------ batches

    def collate(self, prompts: Sequence[PromptInputs], suffixes: Sequence[Sequence[int]]) -> CollatedBatch:
        """One batch of ``prompt[r] + suffixes[r]`` rows (see :class:`CollatedBatch`)."""
        if len(prompts) != len(suffixes) or not prompts:
            raise InvalidInputError("need one suffix (possibly empty) per prompt, and at least one row")
        rows = len(prompts)
        prompt_end = max(len(p) for p in prompts)
        suffix_len = max(len(s) for s in suffixes)
        width = prompt_end + suffix_len
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long, device=self.device)
        attention = torch.zeros((rows, width), dtype=torch.long, device=self.device)
        suffix_ids = torch.full((rows, suffix_len), self.pad_token_id, dtype=torch.long, device=self.device)
        suffix_mask = torch.zeros((rows, suffix_len), dtype=torch.long, device=self.device)
        for r, (prompt, suffix) in enumerate(zip(prompts, suffixes, strict=True)):
            start = prompt_end - len(prompt)
            input_ids[r, start:prompt_end] = prompt.input_ids
            attention[r, start:prompt_end] = 1
            if suffix:
                ids = torch.tensor(list(suffix), dtype=torch.long, device=self.device)
                input_ids[r, prompt_end : prompt_end + len(suffix)] = ids
                attention[r, prompt_end : prompt_end + len(suffix)] = 1
                suffix_ids[r, : len(suffix)] = ids
                suffix_mask[r, : len(suffix)] = 1
        model_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
            **_stack_vision(prompts),
        }
        return CollatedBatch(model_inputs, prompt_end, suffix_ids, suffix_mask)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[PromptInputs], rows: Sequence[int]) -> Prefilled:
        """Run each distinct prompt once (left-padded batch), then give row ``r`` the KV cache of ``prompts[rows[r]]``.

        ``n`` samples or ``M`` continuations of one prompt share its forward pass, its image
        features and its cache instead of recomputing them per row.
        """
        batch = self.collate(prompts, [[] for _ in prompts])
        out = self.model(**batch.model_inputs, use_cache=True, logits_to_keep=1)
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        cache = out.past_key_values
        cache.batch_select_indices(index)
        attention = batch.model_inputs["attention_mask"]
        return Prefilled(
            cache=cache,
            next_logits=out.logits[:, -1][index],
            attention_mask=attention[index],
            next_position=(attention.sum(-1))[index],
        )

    @torch.inference_mode()
    def continuation_logprobs(
        self, prompts: Sequence[PromptInputs], rows: Sequence[int], continuations: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing: full-vocabulary log-softmax (float32) predicting each token of ``continuations[r]``
        after ``prompts[rows[r]]``, as ``(logprobs [R, T, vocab], token_ids [R, T], mask [R, T])``.

        One prefill of the distinct prompts, then one forward pass over all continuations on the
        shared cache. Positions where ``mask`` is 0 are padding.
        """
        if len(rows) != len(continuations) or any(len(c) == 0 for c in continuations):
            raise InvalidInputError("need one non-empty continuation per row")
        pre = self.prefill(prompts, rows)
        width = max(len(c) for c in continuations)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for r, cont in enumerate(continuations):
            ids[r, : len(cont)] = torch.tensor(list(cont), dtype=torch.long, device=self.device)
            mask[r, : len(cont)] = 1
        logits = [pre.next_logits[:, None].float()]
        if width > 1:
            # Token t is predicted from tokens < t: feed all but the last one after the prompt.
            out = self.model(
                input_ids=ids[:, :-1],
                attention_mask=torch.cat([pre.attention_mask, mask[:, :-1]], dim=-1),
                position_ids=pre.next_position[:, None] + torch.arange(width - 1, device=self.device),
                past_key_values=pre.cache,
                use_cache=True,
            )
            logits.append(out.logits.float())
        return torch.log_softmax(torch.cat(logits, dim=1), dim=-1), ids, mask

    # ------------------------------------------------------------ adapters

    def load_adapter(self, name: str, artifact_root: str | Path) -> Path:
        """Load the PEFT adapter saved at ``<artifact_root>/adapters/<name>`` under ``name`` (idempotent)."""
        if name in self.adapters:
            return self.adapters[name]
        path = adapter_path(name, artifact_root)
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        self.model.eval()
        self.adapters[name] = path
        log.info("loaded adapter %s from %s", name, path)
        return path

    @contextlib.contextmanager
    def use_adapter(self, name: str | None) -> Iterator[None]:
        """Run the block with adapter ``name`` active, or with no adapter at all for ``None``."""
        if name is not None and name not in self.adapters:
            raise AdapterNotFoundError(name, "not loaded")
        if not self.adapters:
            yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield


def adapter_path(name: str, artifact_root: str | Path) -> Path:
    """``<artifact_root>/adapters/<name>``, checked: a valid name, inside the root, with an
    ``adapter_config.json``; else :class:`AdapterNotFoundError`."""
    if not ADAPTER_NAME.match(name):
        raise AdapterNotFoundError(name, "not a valid adapter name")
    root = (Path(artifact_root) / "adapters").resolve()
    path = (root / name).resolve()
    if root not in path.parents or not (path / "adapter_config.json").is_file():
        raise AdapterNotFoundError(name, f"no adapter_config.json in {root / name}")
    return path


def load_prompter(name_or_path: str | Path) -> VLMPrompter:
    """Config, processor and chat format of a supported VLM, without its weights.

    Raises :class:`ModelNotFoundError` when nothing loadable is there and
    :class:`UnsupportedModelError` for an architecture outside :data:`MODEL_CLASSES`.
    """
    name = str(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"model {name!r} not found: {exc}") from exc
    if config.model_type not in MODEL_CLASSES:
        raise UnsupportedModelError(
            f"model {name!r} has architecture {config.model_type!r}; supported: {', '.join(MODEL_CLASSES)}"
        )
    processor = AutoProcessor.from_pretrained(name)
    try:
        generation_config = GenerationConfig.from_pretrained(name)
    except OSError:  # no generation_config.json: the one transformers derives from the config
        generation_config = GenerationConfig.from_model_config(config)
    fold_system = _template_rejects_system(processor)
    if fold_system:
        log.info("chat template of %s rejects the system role: system text goes into the user turn", name)
    return VLMPrompter(name=name, processor=processor, config=config, generation_config=generation_config,
                       chat_format=detect_chat_format(getattr(processor, "chat_template", None)),
                       fold_system=fold_system)


def load_vlm(name_or_path: str | Path, device: str = "cpu", dtype: torch.dtype | str = torch.float32) -> LoadedVLM:
    """Load the model and processor of a supported VLM from a Hugging Face id or a local directory
    (errors as :func:`load_prompter`)."""
    prompter = load_prompter(name_or_path)
    torch_dtype = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    model_cls = MODEL_CLASSES[prompter.config.model_type]
    model = model_cls.from_pretrained(prompter.name, dtype=torch_dtype).to(device)
    model.eval()
    return LoadedVLM(**{f.name: getattr(prompter, f.name) for f in dataclasses.fields(VLMPrompter)},
                     model=model, device=torch.device(device), dtype=torch_dtype)


def _template_rejects_system(processor: Any) -> bool:
    if getattr(processor, "chat_template", None) is None:
        raise UnsupportedModelError("the processor has no chat template")
    try:
        processor.apply_chat_template(build_messages("base"), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja's TemplateError from raise_exception(), or a template that trips on it
        log.debug("system role rejected: %s", exc)
        return True
    return False
