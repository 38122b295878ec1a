"""GroundingDINO through transformers (``GroundingDinoForObjectDetection`` + ``GroundingDinoProcessor``).

The text query is written the way the original model was trained on: lower-case phrases separated
by ``" . "`` and ending with ``" ."`` (``"red circle . blue square ."``); the model's own phrase
masks split the query at the ``.`` tokens.

Post-processing follows the original repository's ``predict``: a query (box) is kept when its
highest token probability exceeds ``box_threshold``, and that probability is its score. The
original labels a box with the decoded tokens whose probability exceeds ``text_threshold``, which
can be a fragment or a run across phrases; here the label is the queried phrase whose best token
probability is highest, provided it exceeds ``text_threshold`` (a box with no such phrase is
dropped), so every label is one of the phrases asked for.

Boxes come out of the model as sigmoid ``cxcywh`` relative to the image; as ``xyxy`` a box may
reach past the image border, so it is clipped to the image (the visible part), and a box with no
area left is dropped. Non-finite outputs are an error, never clipped into range.

Items are batched per forward pass when their preprocessed images have the same size: padding a
smaller image into a larger one changes what the Swin backbone sees (it has no pixel mask), so
mixed sizes would make batched results differ from one-by-one results. Text padding is exact:
the model masks padded tokens out of every attention.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoProcessor, GroundingDinoForObjectDetection

from services.grounder.engine import GroundingEngine
from svp.contract import Box

log = logging.getLogger(__name__)

PHRASE_SEPARATOR = " . "
QUERY_END = " ."


@dataclass(frozen=True)
class TextQuery:
    """A GroundingDINO text query and where each phrase sits in it (character spans)."""

    text: str
    phrases: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def from_phrases(cls, phrases: Sequence[str]) -> TextQuery:
        """``["red circle", "cat"]`` -> ``"red circle . cat ."`` with spans ``(0, 10)``, ``(13, 16)``."""
        spans: list[tuple[int, int]] = []
        start = 0
        for phrase in phrases:
            spans.append((start, start + len(phrase)))
            start += len(phrase) + len(PHRASE_SEPARATOR)
        return cls(PHRASE_SEPARATOR.join(phrases) + QUERY_END, tuple(phrases), tuple(spans))

    def phrase_token_mask(self, offsets: torch.Tensor) -> torch.Tensor:
        """``[num_phrases, seq_len]`` bool: token ``t`` belongs to phrase ``j``.

        ``offsets`` are the tokenizer's character offsets of this query's tokens; special and
        padding tokens have the empty offset ``(0, 0)`` and belong to no phrase.
        """
        starts, ends = offsets[:, 0], offsets[:, 1]
        is_text = ends > starts
        rows = [is_text & (starts >= s) & (ends <= e) for s, e in self.spans]
        return torch.stack(rows)


class GroundingDinoEngine(GroundingEngine):
    """transformers' GroundingDINO, loaded from a Hugging Face id or a local directory."""

    name = "groundingdino"

    def __init__(self, model: str, device: str = "cpu", max_batch_size: int = 8):
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.processor = AutoProcessor.from_pretrained(model)
        self.model = GroundingDinoForObjectDetection.from_pretrained(model)
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # transformers types .to oddly
        self.max_text_tokens = int(self.model.config.max_text_len)
        log.info("GroundingDINO %s on %s (max %d text tokens)", model, self.device, self.max_text_tokens)

    def queryable_phrases(self, phrases: Sequence[str]) -> list[str]:
        """The leading phrases whose query fits the model's text length (``[CLS] p1 . p2 . [SEP]``)."""
        tokenizer = self.processor.tokenizer
        used = 2  # [CLS] and [SEP]
        kept: list[str] = []
        for phrase in phrases:
            used += len(tokenizer(phrase, add_special_tokens=False)["input_ids"]) + 1  # + its "."
            if used > self.max_text_tokens:
                log.warning("text query full at %d tokens: querying %d of %d phrases", self.max_text_tokens,
                            len(kept), len(phrases))
                break
            kept.append(phrase)
        return kept

    def detect(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        box_threshold: float,
        text_threshold: float,
    ) -> list[list[Box]]:
        pixels = [self.processor.image_processor(images=image, return_tensors="pt") for image in images]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(pixels):
            by_size.setdefault(tuple(p["pixel_values"].shape), []).append(i)
        results: list[list[Box]] = [[] for _ in images]
        for indices in by_size.values():
            for start in range(0, len(indices), self.max_batch_size):
                chunk = indices[start : start + self.max_batch_size]
                boxes = self._forward(
                    torch.cat([pixels[i]["pixel_values"] for i in chunk]),
                    torch.cat([pixels[i]["pixel_mask"] for i in chunk]),
                    [TextQuery.from_phrases(phrases[i]) for i in chunk],
                    box_threshold,
                    text_threshold,
                )
                for i, item_boxes in zip(chunk, boxes, strict=True):
                    results[i] = item_boxes
        return results

    @torch.inference_mode()
    def _forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor,
        queries: list[TextQuery],
        box_threshold: float,
        text_threshold: float,
    ) -> list[list[Box]]:
        text = self.processor.tokenizer(
            [q.text for q in queries],
            padding="longest",
            return_offsets_mapping=True,
            return_token_type_ids=True,
            return_tensors="pt",
        )
        offsets = text.pop("offset_mapping")
        outputs = self.model(
            pixel_values=pixel_values.to(self.device),
            pixel_mask=pixel_mask.to(self.device),
            **{k: v.to(self.device) for k, v in text.items()},
        )
        seq_len = text["input_ids"].shape[1]
        # Positions past the query (and padding) hold -inf logits, i.e. probability 0.
        probs = outputs.logits.float().sigmoid().cpu()  # [batch, queries, max_text_len]
        scores = probs.max(dim=-1).values
        cx, cy, w, h = outputs.pred_boxes.float().cpu().unbind(-1)
        corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        if not torch.isfinite(corners).all():
            raise RuntimeError("GroundingDINO returned non-finite boxes")

        results: list[list[Box]] = []
        for b, query in enumerate(queries):
            phrase_mask = query.phrase_token_mask(offsets[b])  # [phrases, seq_len]
            phrase_probs = (probs[b, :, None, :seq_len] * phrase_mask[None]).amax(dim=-1)  # [queries, phrases]
            best_prob, best_phrase = phrase_probs.max(dim=-1)
            keep = (scores[b] > box_threshold) & (best_prob > text_threshold)
            clipped = corners[b].clamp(0.0, 1.0)
            boxes: list[Box] = []
            for q in keep.nonzero().flatten().tolist():
                x1, y1, x2, y2 = (float(c) for c in clipped[q])
                if x2 <= x1 or y2 <= y1:  # entirely outside the image
                    continue
                boxes.append(Box(label=query.phrases[best_phrase[q]], xyxy=(x1, y1, x2, y2), score=float(scores[b, q])))
            results.append(boxes)
        return results
