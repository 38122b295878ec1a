import math

import pytest

from svp.selection import Candidate, degenerate_reason, select_top


def test_degenerate_reasons():
    assert degenerate_reason("   ", "stop") == "empty"
    assert degenerate_reason("In the image, there is a red circle", "length") == "truncated"
    loop = "In the image, " + "there is a red circle " * 5
    assert degenerate_reason(loop, "stop") == "repetition"
    assert degenerate_reason("A red circle. A red circle.", "stop") == "repetition"
    assert degenerate_reason("circle", "stop") == "not_a_description"
    assert degenerate_reason("In the image, there is a red circle. A blue square is below it.", "stop") is None


def test_select_top_ceil_ratio_ties_and_reasons():
    good = "In the image, there is a red circle at the top."
    cands = [
        Candidate(0, good, 1.0, "stop"),
        Candidate(1, good, 3.0, "stop"),
        Candidate(2, "", 9.0, "stop"),
        Candidate(3, good, 3.0, "stop"),
        Candidate(4, good + " and", 8.0, "length"),
        Candidate(5, good, float("nan"), "stop"),
        Candidate(6, good, 2.0, "stop"),
    ]
    res = select_top(cands, 0.3)  # ceil(0.3 * 7) = 3
    assert [c.index for c in res.selected] == [1, 3, 6]
    assert res.dropped == {2: "empty", 4: "truncated", 5: "unscored"}
    shuffled = select_top(list(reversed(cands)), 0.3)
    assert [c.index for c in shuffled.selected] == [1, 3, 6]
    assert len(select_top(cands, 0.2).selected) == math.ceil(0.2 * 7)


def test_ratio_must_be_in_unit_interval():
    with pytest.raises(ValueError):
        select_top([], 0.0)


def test_unverified_candidates_are_dropped_before_ranking():
    good = "In the image, there is a red circle at the top."
    cands = [Candidate(0, good, 5.0, "stop", verified=False), Candidate(1, good, 1.0, "stop"),
             Candidate(2, good, 2.0, "stop")]
    res = select_top(cands, 0.5)  # ceil(0.5 * 3) = 2 of the 3, but only 2 are verified
    assert [c.index for c in res.selected] == [2, 1]
    assert res.dropped == {0: "unverified"}
