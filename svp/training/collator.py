"""Conversation samples -> model inputs with labels masked to the answer tokens.

A sample is rendered through the model's own chat template (via :class:`~svp.models.loading.LoadedVLM`),
exactly as the sampler prompts it: SVP's selected samples as ``build_messages("base", answer=z)``
(the sampling system prompt and the base prompt; the grounding is never shown), other
questions (CVQ's VQ pairs) as plain user turns with no system prompt, the way the model's own
instruction data was written.

The rendered text is cut into segments at the template's generation prompt of every assistant
turn: the first prompt segment (it holds the image) goes through the processor, which expands
the image placeholder into the model's image tokens, as at inference; later segments are
tokenised without special tokens. Labels are ``-100`` everywhere except the answer tokens and the
token that ends each answer (``</s>`` or ``<|im_end|>``), so the model learns to stop.

``max_length`` bounds the text: the image counts as one token (LLaVA's own tokenisation, where the
placeholder is one token until the vision features are spliced in), so image tokens are never
cut; text beyond the budget is cut from the right. A sample whose prompt alone fills the budget
cannot be trained on and raises :class:`SampleTooLongError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from svp.models.loading import LoadedVLM, PromptInputs
from svp.prompts import PAPER_PROMPTS
from svp.training.dataset import ConversationSample

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class SampleTooLongError(ValueError):
    """The prompt of a sample (image counted as one token) leaves no room for its answer."""


@dataclass
class EncodedSample:
    """One sample: the image-bearing first prompt, then every later token with its label."""

    prompt: PromptInputs
    suffix_ids: list[int]
    suffix_labels: list[int]
    """``IGNORE_INDEX`` or the token id, aligned with ``suffix_ids``."""


@dataclass
class TrainingBatch:
    model_inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    supervised_tokens: int
    """Positions whose label is predicted (not ``IGNORE_INDEX``): the loss normaliser."""


def load_image(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def conversation_messages(vlm: LoadedVLM, sample: ConversationSample) -> list[dict[str, Any]]:
    """The chat messages of a sample (see the module docstring for which get a system prompt)."""
    first = sample.turns[0]
    if len(sample.turns) == 1 and first.question == PAPER_PROMPTS.base:
        return vlm.messages("base", answer=first.answer)
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(sample.turns):
        content: list[dict[str, Any]] = [{"type": "text", "text": turn.question}]
        if i == 0:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.answer}]})
    return messages


class ConversationCollator:
    """Encodes samples and pads them into :class:`TrainingBatch` es for one loaded VLM."""

    def __init__(self, vlm: LoadedVLM, max_length: int):
        self.vlm = vlm
        self.max_length = max_length
        self._warned_no_end_token = False

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return str(
            self.vlm.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        )

    def segments(self, sample: ConversationSample) -> list[tuple[str, bool]]:
        """The rendered conversation as ``(text, is_answer)`` segments, in order.

        Each prompt segment ends where the template's generation prompt ends, so the first one is
        exactly the text the sampler generates from; each answer segment holds the answer as the
        template writes it (with any leading space, as the model would generate it).
        """
        messages = conversation_messages(self.vlm, sample)
        full = self._render(messages, generation_prompt=False)
        segments: list[tuple[str, bool]] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            answer = message["content"][0]["text"]
            prompt = self._render(messages[:i], generation_prompt=True)
            upto = self._render(messages[: i + 1], generation_prompt=False)
            if not (full.startswith(upto) and upto.startswith(prompt)) or answer not in upto[len(prompt) :]:
                raise ValueError(
                    f"sample {sample.id}: the chat template does not render turns as prefixes of the conversation"
                )
            answer_end = len(prompt) + upto[len(prompt) :].rindex(answer) + len(answer)
            segments += [(full[cursor : len(prompt)], False), (full[len(prompt) : answer_end], True)]
            cursor = answer_end
        segments.append((full[cursor:], False))
        return segments

    def _encode_prompt(self, text: str, image: Image.Image) -> PromptInputs:
        # The same call LoadedVLM.prompt_inputs makes for the sampler (a test holds them equal),
        # for any prompt text rather than only the SVP prompt kinds.
        bos = self.vlm.tokenizer.bos_token
        add_special = not (bos is not None and text.startswith(bos))
        encoded = self.vlm.processor(images=image, text=text, return_tensors="pt", add_special_tokens=add_special)
        vision = {
            k: (v.to(self.vlm.device, self.vlm.dtype) if torch.is_floating_point(v) else v.to(self.vlm.device))
            for k, v in encoded.items()
            if k not in ("input_ids", "attention_mask")
        }
        return PromptInputs(input_ids=encoded["input_ids"][0].to(self.vlm.device), vision=vision)

    def encode(self, sample: ConversationSample, image: Image.Image) -> EncodedSample:
        segments = self.segments(sample)
        prompt = self._encode_prompt(segments[0][0], image)
        stop_ids = self.vlm.stop_token_ids
        suffix_ids: list[int] = []
        suffix_labels: list[int] = []
        after_answer = False
        for text, is_answer in segments[1:]:
            ids = [int(t) for t in self.vlm.tokenizer(text, add_special_tokens=False)["input_ids"]] if text else []
            if is_answer:
                labels = list(ids)
            else:
                labels = [IGNORE_INDEX] * len(ids)
                if after_answer and ids and ids[0] in stop_ids:
                    labels[0] = ids[0]  # the end-of-answer token: the model must learn to stop
                elif after_answer and not self._warned_no_end_token:
                    log.warning("the chat template writes no stop token right after an answer; none is supervised")
                    self._warned_no_end_token = True
            suffix_ids += ids
            suffix_labels += labels
            after_answer = is_answer
        return self._truncate(sample, EncodedSample(prompt, suffix_ids, suffix_labels))

    def _truncate(self, sample: ConversationSample, encoded: EncodedSample) -> EncodedSample:
        image_tokens = int((encoded.prompt.input_ids == self.vlm.image_token_id).sum())
        prompt_text_len = len(encoded.prompt) - image_tokens + min(image_tokens, 1)
        room = self.max_length - prompt_text_len
        if room <= 0 or not any(label != IGNORE_INDEX for label in encoded.suffix_labels[:room]):
            raise SampleTooLongError(
                f"sample {sample.id!r}: its prompt has {prompt_text_len} text tokens (image counted as one), "
                f"leaving no answer token within max_length {self.max_length}"
            )
        if len(encoded.suffix_ids) > room:
            encoded.suffix_ids = encoded.suffix_ids[:room]
            encoded.suffix_labels = encoded.suffix_labels[:room]
        return encoded

    def collate(self, encoded: Sequence[EncodedSample]) -> TrainingBatch:
        """Pad encoded samples into one batch (prompts left-padded as the sampler does, suffixes right-padded)."""
        batch = self.vlm.collate([e.prompt for e in encoded], [e.suffix_ids for e in encoded])
        labels = torch.full_like(batch.model_inputs["input_ids"], IGNORE_INDEX)
        for row, e in enumerate(encoded):
            if e.suffix_labels:
                labels[row, batch.prompt_end : batch.prompt_end + len(e.suffix_labels)] = torch.tensor(
                    e.suffix_labels, dtype=torch.long
                )
        return TrainingBatch(batch.model_inputs, labels, int((labels[:, 1:] != IGNORE_INDEX).sum()))

    def __call__(self, samples: Sequence[ConversationSample]) -> TrainingBatch:
        """Load each sample's image (``sample.image`` must be a resolved path), encode, pad."""
        return self.collate([self.encode(s, load_image(s.image)) for s in samples])
