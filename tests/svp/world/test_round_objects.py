"""The demo's accounting of a round's own samples, against counts done by hand on known scenes."""

from __future__ import annotations

import pytest

from svp.contract import GroundedCandidate, ImageResult
from svp.world.round_objects import (
    round_object_metrics,
    round_objects_table,
    scene_truth,
    score_hallucination_correlation,
)

# unlabelled-000000 holds a small blue circle (top) and a small orange circle (right);
# unlabelled-000002 one large yellow circle.
BOTH = "In the image, at the top there is a small blue circle. On the right there is a small orange circle."
WRONG_SHAPE = "In the image, at the top there is a small blue circle. On the right there is a small orange diamond."
BLUE_ONLY = "In the image, at the top there is a small blue circle."
YELLOW = "In the image, on the top right there is a large yellow circle."
INVENTED = "In the image, on the top right there is a large yellow circle. At the center there is a red square."


def _record(image: str, index: int, prior: list[str], candidates: list[str], selected: list[int],
            status: str = "done", scores: list[float] | None = None) -> ImageResult:
    return ImageResult(
        image=image, index=index, round=1, adapter=None, status=status,  # type: ignore[arg-type]
        prior=prior, selected=selected,
        candidates=[GroundedCandidate(index=i, text=t, finish_reason="stop", score=(scores or [1.0] * len(candidates))[i])
                    for i, t in enumerate(candidates)],
    )


def test_scene_truth_reads_the_scene_from_the_image_name() -> None:
    assert scene_truth("unlabelled/images/unlabelled-000000.png") == {"blue circle": 1, "orange circle": 1}
    assert scene_truth("unlabelled-000002.png") == {"yellow circle": 1}
    with pytest.raises(ValueError, match="not a ShapesWorld scene"):
        scene_truth("photos/cat.jpg")


def test_round_object_metrics_counts_each_group_of_samples() -> None:
    records = [
        _record("unlabelled/images/unlabelled-000000.png", 0, [BLUE_ONLY, WRONG_SHAPE], [BOTH, WRONG_SHAPE], [0]),
        _record("unlabelled/images/unlabelled-000002.png", 1, [YELLOW], [INVENTED], [0]),
        # a failed image counts nowhere: its samples (none here) never reached training
        _record("unlabelled/images/unlabelled-000001.png", 2, [], [], [], status="failed"),
    ]
    m = round_object_metrics(records)
    # priors: BLUE_ONLY 1/2 found, 0 of 1 wrong; WRONG_SHAPE 1/2, 1 of 2 wrong; YELLOW 1/1, 0 of 1 wrong
    assert m["prior samples"]["object_recall"] == pytest.approx(3 / 5)
    assert m["prior samples"]["hallucination_rate"] == pytest.approx(1 / 4)
    assert m["prior samples"]["samples"] == 3
    # grounded: BOTH 2/2 and 0/2; WRONG_SHAPE 1/2 and 1/2; INVENTED 1/1 and 1/2
    assert m["grounded samples"]["object_recall"] == pytest.approx(4 / 5)
    assert m["grounded samples"]["hallucination_rate"] == pytest.approx(2 / 6)
    assert m["grounded samples"]["mentions_per_caption"] == pytest.approx(6 / 3)
    # selected: BOTH and INVENTED; not selected: WRONG_SHAPE
    assert m["selected"]["object_recall"] == pytest.approx(3 / 3)
    assert m["selected"]["hallucination_rate"] == pytest.approx(1 / 4)
    assert m["not selected"]["object_recall"] == pytest.approx(1 / 2)
    assert m["not selected"]["hallucination_rate"] == pytest.approx(1 / 2)
    assert (m["selected"]["samples"], m["not selected"]["samples"]) == (2, 1)
    table = round_objects_table(m, 2)
    assert "round 2's own samples" in table and "not selected" in table and "0.250" in table


def test_score_hallucination_correlation_ranks_within_each_image() -> None:
    records = [
        # hallucinated mentions 0, 1, 0 against scores 1, 3, 2: Spearman, ties at mean rank, by hand:
        # ranks (1, 3, 2) and (1.5, 3, 1.5) -> 1.5 / (sqrt(2) * sqrt(1.5)) = 0.866
        _record("unlabelled-000000.png", 0, [], [BOTH, WRONG_SHAPE, BLUE_ONLY], [1], scores=[1.0, 3.0, 2.0]),
        # the invented square scores lower: -1
        _record("unlabelled-000002.png", 1, [], [YELLOW, INVENTED], [0], scores=[2.0, 1.0]),
        # equal scores, equal hallucination, one sample, or a failed image: no ranking to judge
        _record("unlabelled-000002.png", 2, [], [YELLOW, INVENTED], [0], scores=[1.0, 1.0]),
        _record("unlabelled-000000.png", 3, [], [BOTH, BLUE_ONLY], [0], scores=[1.0, 2.0]),
        _record("unlabelled-000000.png", 4, [], [WRONG_SHAPE], [0]),
        _record("unlabelled-000000.png", 5, [], [BOTH, WRONG_SHAPE], [0], status="failed", scores=[1.0, 2.0]),
    ]
    got = score_hallucination_correlation(records)
    assert got["images"] == 2
    assert got["spearman"] == pytest.approx((1.5 / (2 ** 0.5 * 1.5 ** 0.5) - 1) / 2)
    line = round_objects_table(round_object_metrics(records), 1, got).splitlines()[-1]
    assert "Spearman -0.067 (mean over 2 images" in line
    assert score_hallucination_correlation(records[2:])["spearman"] is None
    assert "n/a" in round_objects_table(round_object_metrics(records[2:]), 1, score_hallucination_correlation(records[2:]))
