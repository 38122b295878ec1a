"""Bootstrap confidence intervals for the object metrics, resampling scenes (images).

Object recall and hallucination rate are ratios of sums over captions (matched / ground-truth
objects, unmatched / mentioned), so scenes, not mentions, are the independent units: a
resample draws scenes with replacement and recomputes both ratios from their counts. Two
models captioned the same scenes, so their difference is bootstrapped *paired* — the same
resampled scenes for both — which is what tells whether an adapter changed the model by more
than the test set's noise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from svp.evaluation.metrics import MentionParser, object_counts

OBJECT_METRICS = ("object_recall", "hallucination_rate")


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def scene_counts(captions: Sequence[str], truths: Sequence[Counter[str]], parse: MentionParser) -> np.ndarray:
    """[scenes, 3]: ground-truth objects, mentions and matched mentions of each scene's caption."""
    if len(captions) != len(truths):
        raise ValueError("need one ground truth per caption")
    return np.array([object_counts(c, t, parse) for c, t in zip(captions, truths, strict=True)], dtype=np.int64)


def _ratios(counts: np.ndarray) -> np.ndarray:
    """[..., 2] recall and hallucination rate from counts summed over the scene axis (-2)."""
    truth, mentions, matched = np.moveaxis(counts.sum(axis=-2), -1, 0)
    recall = np.divide(matched, truth, out=np.zeros(np.shape(truth)), where=truth > 0)
    unmatched = mentions - matched
    hallucination = np.divide(unmatched, mentions, out=np.zeros(np.shape(mentions)), where=mentions > 0)
    return np.stack([recall, hallucination], axis=-1)


def object_intervals(
    counts: Mapping[str, np.ndarray], baseline: str = "base", resamples: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Interval]]:
    """Percentile intervals of each model's recall and hallucination rate, and of each other
    model's difference from ``baseline`` (keys ``"<name> - <baseline>"``), paired over scenes."""
    n = {len(c) for c in counts.values()}
    if len(n) != 1 or n == {0}:
        raise ValueError("every model needs counts for the same, non-empty set of scenes")
    draws = np.random.default_rng(seed).integers(0, n.pop(), size=(resamples, len(next(iter(counts.values())))))
    alpha = (1 - level) / 2
    point = {name: _ratios(c) for name, c in counts.items()}
    boot = {name: _ratios(c[draws]) for name, c in counts.items()}  # [resamples, 2]

    def interval(value: np.ndarray, samples: np.ndarray) -> dict[str, Interval]:
        low, high = np.quantile(samples, [alpha, 1 - alpha], axis=0)
        return {m: Interval(float(value[i]), float(low[i]), float(high[i])) for i, m in enumerate(OBJECT_METRICS)}

    out = {name: interval(point[name], boot[name]) for name in counts}
    for name in counts:
        if name != baseline:
            out[f"{name} - {baseline}"] = interval(point[name] - point[baseline], boot[name] - boot[baseline])
    return out


def intervals_table(intervals: Mapping[str, Mapping[str, Interval]], scenes: int, level: float = 0.95) -> str:
    """One row per model (and difference), value [low, high] per object metric."""
    width = max(len(k) for k in intervals)
    head = f"{'model':<{width}}" + "".join(f"{m:>28}" for m in OBJECT_METRICS)
    lines = [f"object metrics on {scenes} held-out scenes, {level:.0%} bootstrap intervals over scenes", head,
             "-" * len(head)]
    for name, metrics in intervals.items():
        lines.append(f"{name:<{width}}" + "".join(f"{str(metrics[m]):>28}" for m in OBJECT_METRICS))
    return "\n".join(lines)
