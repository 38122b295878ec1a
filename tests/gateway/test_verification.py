"""``verify``'s count of what a caption names, by hand."""

from gateway.inner_loop import introductions, unboxed_phrases
from svp.contract import Box, GroundingResult


def test_introductions_count_indefinite_mentions_longest_phrase_first() -> None:
    assert introductions("A dog runs. The dog barks.", ["dog"]) == {"dog": 1}
    assert introductions("A dog on the left. A dog on the right.", ["dog"]) == {"dog": 2}
    phrases = ["red circle", "large red circle"]
    assert introductions("There is a large red circle and a red circle.", phrases) == {
        "large red circle": 1, "red circle": 1}
    assert introductions("Red circles everywhere.", ["red circle"]) == {"red circle": 1}  # named, not introduced


def test_a_phrase_is_unverified_when_fewer_boxes_carry_it_than_it_names() -> None:
    boxes = [Box(label="dog", xyxy=(0.0, 0.0, 0.5, 0.5), score=0.9),
             Box(label="small orange", xyxy=(0.5, 0.5, 1.0, 1.0), score=0.4)]  # partial match of the triangle
    result = GroundingResult(phrases=["dog", "small orange triangle"], boxes=boxes, context="")
    assert unboxed_phrases("A dog and a small orange triangle.", result) == ["small orange triangle"]
    assert unboxed_phrases("A dog. A dog.", result) == ["dog", "small orange triangle"]
    assert unboxed_phrases("A dog, the dog.", result) == ["small orange triangle"]
