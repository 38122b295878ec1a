import pytest
from pydantic import ValidationError

from svp.contract import Box
from svp.grounding import box_iou, extract_phrases_fallback, nms, render_context


def test_fallback_phrases_from_descriptive_caption():
    caption = (
        "In the image, at the top left there is a large red circle. Two small blue squares are next to "
        "the green triangle, and a yellow star sits in the center of the picture."
    )
    phrases = extract_phrases_fallback(caption)
    assert phrases[:3] == ["large red circle", "small blue squares", "green triangle"]
    assert "image" not in " ".join(phrases) and "top left" not in phrases and "picture" not in phrases


def test_fallback_drops_counts_and_duplicates():
    assert extract_phrases_fallback("There are three red circles. The red circles are big.") == ["red circles"]
    assert extract_phrases_fallback("") == []


def test_iou_by_hand():
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(0.0625 / (0.25 + 0.25 - 0.0625))
    assert box_iou((0, 0, 0.1, 0.1), (0.5, 0.5, 0.6, 0.6)) == 0.0


def _b(label, xyxy, score):
    return Box(label=label, xyxy=xyxy, score=score)


def test_nms_same_and_different_labels():
    a = _b("red circle", (0.1, 0.1, 0.4, 0.4), 0.9)
    a_dup = _b("red circle", (0.12, 0.1, 0.42, 0.4), 0.6)  # IoU ~0.88 with a
    other = _b("circle", (0.11, 0.1, 0.41, 0.4), 0.7)  # different label, same object
    far = _b("blue square", (0.6, 0.6, 0.9, 0.9), 0.5)
    assert nms([a_dup, a, far, other], 0.5) == [a, far]
    per_label = nms([a_dup, a, far, other], 0.5, class_agnostic=False)
    assert per_label == [a, other, far]
    # Below the threshold both survive.
    assert nms([a, a_dup], 0.95) == [a, a_dup]


def test_render_context_is_deterministic_and_rounded():
    boxes = [
        _b("blue square", (0.6, 0.6, 0.9, 0.9), 0.5),
        _b("red circle", (0.1049, 0.1, 0.4, 0.4), 0.9),
    ]
    text = render_context(boxes)
    assert text == "red circle: [0.10, 0.10, 0.40, 0.40]\nblue square: [0.60, 0.60, 0.90, 0.90]"
    assert render_context(list(reversed(boxes))) == text
    assert render_context([]) == ""


def test_render_context_follows_a_position_first_caption():
    # a large object at the top right starts higher than a small one at the top left, yet a caption
    # names the top left first; the centre-bottom one comes last even though it starts in the middle third
    top_right = _b("large blue square", (0.70, 0.03, 0.95, 0.30), 0.9)
    top_left = _b("small red circle", (0.05, 0.20, 0.12, 0.28), 0.9)
    bottom = _b("green diamond", (0.40, 0.60, 0.60, 0.95), 0.9)
    middle_right = _b("red triangle", (0.80, 0.45, 0.90, 0.55), 0.9)
    lines = render_context([bottom, middle_right, top_right, top_left]).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "small red circle", "large blue square", "red triangle", "green diamond"
    ]


@pytest.mark.parametrize(
    "xyxy, fragment",
    [
        ((0.5, 0.1, 0.4, 0.3), "x1 <= x2"),
        ((0.1, 0.1, 1.2, 0.3), "normalised"),
        ((-0.1, 0.1, 0.2, 0.3), "normalised"),
        ((float("nan"), 0.1, 0.2, 0.3), "finite"),
    ],
)
def test_malformed_boxes_are_rejected_not_clipped(xyxy, fragment):
    with pytest.raises(ValidationError, match=fragment):
        Box(label="x", xyxy=xyxy)
