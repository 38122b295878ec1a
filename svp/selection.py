"""Per-image selection of grounded samples: drop degenerate ones, keep the top ``ceil(ratio·K)``."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

DropReason = Literal["empty", "repetition", "truncated", "not_a_description", "unscored", "unverified"]

_WORDS = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class Candidate:
    """One grounded sample of an image with its score. ``index`` is its position among the K."""

    index: int
    text: str
    score: float
    finish_reason: Literal["stop", "length"]
    verified: bool = True
    """False: the grounder found no box for one of the noun phrases it names (see ``RunCreate.verify``)."""


@dataclass(frozen=True)
class SelectionResult:
    selected: list[Candidate]  # best first
    dropped: dict[int, DropReason]  # sample index -> why it was dropped


def degenerate_reason(
    text: str, finish_reason: str, ngram: int = 4, max_ngram_repeats: int = 3, min_words: int = 3
) -> DropReason | None:
    """Why a sample is unusable as training data, or None.

    * ``empty``: no words;
    * ``truncated``: generation hit the token limit without an end token;
    * ``repetition``: some word ``ngram`` occurs more than ``max_ngram_repeats`` times (a loop), or
      the same sentence appears twice;
    * ``not_a_description``: fewer than ``min_words`` words.
    """
    words = _WORDS.findall(text.lower())
    if not words:
        return "empty"
    if finish_reason == "length":
        return "truncated"
    grams = Counter(tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1))
    if grams and max(grams.values()) > max_ngram_repeats:
        return "repetition"
    sentences = [s.strip().lower() for s in re.split(r"[.!?]+", text) if s.strip()]
    if len(sentences) != len(set(sentences)):
        return "repetition"
    if len(words) < min_words:
        return "not_a_description"
    return None


def select_top(candidates: list[Candidate], ratio: float) -> SelectionResult:
    """Keep the top ``ceil(ratio · K)`` non-degenerate, verified candidates by score (K = all candidates).

    Ties are broken by the lower sample index, so the result never depends on input order.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    keep = math.ceil(ratio * len(candidates))
    dropped: dict[int, DropReason] = {}
    valid: list[Candidate] = []
    for c in candidates:
        reason = degenerate_reason(c.text, c.finish_reason)
        if reason is None and not c.verified:
            reason = "unverified"
        if reason is None and not math.isfinite(c.score):
            reason = "unscored"
        if reason is None:
            valid.append(c)
        else:
            dropped[c.index] = reason
    valid.sort(key=lambda c: (-c.score, c.index))
    return SelectionResult(selected=valid[:keep], dropped=dropped)
