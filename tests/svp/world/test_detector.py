from svp.contract import Box
from svp.grounding import box_iou
from svp.world.detector import PhraseQuery, ShapesDetector
from svp.world.scenes import COLOURS, SHAPES, generate_scene, generate_scenes


def test_boxes_and_attributes_match_ground_truth_on_test_scenes():
    detector = ShapesDetector()
    n = hits = attributes = 0
    for scene in generate_scenes("test", 120):
        found = detector.detect_objects(scene.render())
        assert len(found) == len(scene.objects)
        for obj in scene.objects:
            best = max(found, key=lambda d: box_iou(d.xyxy, obj.box))
            n += 1
            hits += box_iou(best.xyxy, obj.box) >= 0.9
            attributes += (best.shape, best.colour, best.size) == (obj.shape, obj.colour, obj.size)
    assert hits / n >= 0.99
    assert attributes / n >= 0.99


def test_detect_returns_contract_boxes_for_named_objects_only():
    scene = generate_scene("test", 3)  # small red diamond (top), small green triangle (bottom)
    detector = ShapesDetector()
    image = scene.render()
    red, green = scene.objects
    boxes = detector.detect(image, ["small red diamond", "green triangle", "blue circle", "large red diamond"])
    assert [b.label for b in boxes] == ["small red diamond", "green triangle"]
    assert all(isinstance(b, Box) and 0.5 <= b.score <= 1.0 for b in boxes)
    assert box_iou(boxes[0].xyxy, red.box) > 0.99 and box_iou(boxes[1].xyxy, green.box) > 0.99
    # a bare shape or colour selects every object that has it; words outside the domain select nothing
    assert len(detector.detect(image, ["triangles"])) == 1
    assert detector.detect(image, ["image", "the top left", "dog"]) == []
    # the detector reads pixels: a resized image gives the same normalised boxes
    big = detector.detect(image.resize((192, 192), 0), ["red diamond"])
    assert box_iou(big[0].xyxy, red.box) > 0.99


def test_phrase_query_parsing():
    assert PhraseQuery.parse("a Large RED circles") == PhraseQuery("large", "red", "circle")
    assert PhraseQuery.parse("blue object") == PhraseQuery(None, "blue", None)
    assert set(SHAPES) <= {PhraseQuery.parse(s).shape for s in SHAPES}
    assert {PhraseQuery.parse(c).colour for c in COLOURS} == set(COLOURS)
