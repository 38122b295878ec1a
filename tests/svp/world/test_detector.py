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


def test_strict_detect_returns_contract_boxes_for_named_objects_only():
    scene = generate_scene("test", 3)  # small red diamond (top), small green triangle (bottom)
    detector = ShapesDetector(partial_matches=False)
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


def test_a_phrase_with_one_wrong_attribute_boxes_its_best_partial_match_at_half_score():
    scene = generate_scene("test", 3)  # small red diamond (top), small green triangle (bottom)
    red, green = scene.objects
    image = scene.render()
    strict = {b.label: b for b in ShapesDetector(partial_matches=False).detect(image, ["small red diamond"])}
    boxes = ShapesDetector().detect(image, ["small red triangle", "large red diamond", "small green diamond",
                                            "blue circle", "small red diamond"])
    # one wrong word (shape, size or colour): the object it was about, labelled with the words
    # that match it, as GroundingDINO's text threshold labels a box; the green triangle misses
    # "small red triangle" by its colour, the red diamond by its shape only
    assert [b.label for b in boxes] == ["small red", "red diamond", "small green", "small red diamond"]
    assert box_iou(boxes[0].xyxy, red.box) > 0.99
    assert box_iou(boxes[1].xyxy, red.box) > 0.99
    assert box_iou(boxes[2].xyxy, green.box) > 0.99
    # two wrong words ("blue circle"): nothing; a full match is found as before, at full score
    assert boxes[3].score == strict["small red diamond"].score
    # a partial match scores half what the object's full match would (size is read exactly)
    assert boxes[1].score == round(0.5 * strict["small red diamond"].score, 4)
    # nothing left in common once the wrong word is dropped: no box (never an empty label)
    assert ShapesDetector().detect(image, ["circle", "small circle", "large square"]) == []
    # a phrase that matches some object fully gets no partial matches besides
    assert [b.label for b in ShapesDetector().detect(image, ["red diamond"])] == ["red diamond"]


def test_every_box_has_a_label_whatever_the_phrase():
    from itertools import product

    from svp.world.scenes import SIZES

    phrases = [" ".join(w for w in words if w) for words in product(("", *SIZES), ("", *COLOURS), ("", *SHAPES))]
    detector = ShapesDetector()
    for scene in generate_scenes("test", 20):
        for box in detector.detect(scene.render(), phrases):
            query = PhraseQuery.parse(box.label)
            assert box.label.strip() and (query.colour or query.shape), box.label  # a label names what it boxes


def test_phrase_query_parsing():
    assert PhraseQuery.parse("a Large RED circles") == PhraseQuery("large", "red", "circle")
    assert PhraseQuery.parse("blue object") == PhraseQuery(None, "blue", None)
    assert set(SHAPES) <= {PhraseQuery.parse(s).shape for s in SHAPES}
    assert {PhraseQuery.parse(c).colour for c in COLOURS} == set(COLOURS)
