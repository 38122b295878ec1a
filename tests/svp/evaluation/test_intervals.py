"""Bootstrap intervals of the object metrics: point values by hand, resamples against a plain loop."""

from collections import Counter

import numpy as np
import pytest

from svp.evaluation.intervals import Interval, object_intervals, scene_counts
from svp.world.language import mentioned_objects

TRUTHS = [Counter({"red circle": 1, "blue square": 1}), Counter({"green triangle": 1}), Counter({"red circle": 2})]


def test_scene_counts_by_hand():
    captions = ["There is a red circle and a yellow diamond.", "There is a green triangle.", "There is a red circle."]
    counts = scene_counts(captions, TRUTHS, mentioned_objects)
    # (ground-truth objects, mentions, matched mentions) per scene
    assert counts.tolist() == [[2, 2, 1], [1, 1, 1], [2, 1, 1]]
    intervals = object_intervals({"base": counts}, resamples=200)
    assert intervals["base"]["object_recall"].value == pytest.approx(3 / 5)
    assert intervals["base"]["hallucination_rate"].value == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="one ground truth per caption"):
        scene_counts(captions[:2], TRUTHS, mentioned_objects)


def _loop_bootstrap(counts: dict[str, np.ndarray], resamples: int, seed: int) -> dict[str, list[tuple[float, float]]]:
    """The same resampling written as a plain loop over resamples and scenes."""
    n = len(next(iter(counts.values())))
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in counts}
    for row in draws:
        for name, c in counts.items():
            truth = sum(int(c[i][0]) for i in row)
            mentions = sum(int(c[i][1]) for i in row)
            matched = sum(int(c[i][2]) for i in row)
            out[name].append((matched / truth if truth else 0.0,
                              (mentions - matched) / mentions if mentions else 0.0))
    return out


def test_intervals_match_a_plain_loop_and_pair_the_difference():
    rng = np.random.default_rng(1)
    truth = rng.integers(1, 5, size=60)
    base = np.stack([truth, rng.integers(1, 4, size=60), np.zeros(60, dtype=int)], axis=1)
    base[:, 2] = np.minimum(base[:, 1], rng.integers(0, 3, size=60))
    better = base.copy()
    better[:, 2] = np.minimum(better[:, 1], better[:, 2] + 1)  # one more right mention wherever possible
    counts = {"base": base, "SVP": better}
    got = object_intervals(counts, resamples=500, seed=3)
    loop = _loop_bootstrap(counts, 500, 3)
    for name in counts:
        samples = np.array(loop[name])
        for i, metric in enumerate(("object_recall", "hallucination_rate")):
            low, high = np.quantile(samples[:, i], [0.025, 0.975])
            assert got[name][metric].low == pytest.approx(low) and got[name][metric].high == pytest.approx(high)
    diff = np.array(loop["SVP"]) - np.array(loop["base"])
    low, high = np.quantile(diff[:, 0], [0.025, 0.975])
    assert got["SVP - base"]["object_recall"].low == pytest.approx(low)
    assert got["SVP - base"]["object_recall"].high == pytest.approx(high)
    # one more right mention on most scenes: the paired difference is clear of zero
    assert got["SVP - base"]["object_recall"].excludes_zero()
    assert got["SVP - base"]["hallucination_rate"].high < 0


def test_identical_models_differ_by_exactly_zero_and_bad_input_is_refused():
    counts = np.array([[2, 2, 1], [1, 1, 1], [2, 1, 1]])
    same = object_intervals({"base": counts, "SVP": counts.copy()}, resamples=100)
    assert same["SVP - base"]["object_recall"] == Interval(0.0, 0.0, 0.0)
    assert not same["SVP - base"]["hallucination_rate"].excludes_zero()
    with pytest.raises(ValueError, match="same, non-empty set of scenes"):
        object_intervals({"base": counts, "SVP": counts[:2]})
