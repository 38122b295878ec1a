"""The grounder as a real uvicorn process with the ShapesWorld detector: boxes match the ground truth."""

from __future__ import annotations

from services.grounder.engine import create_engine
from services.grounder.settings import Settings
from svp.client import GrounderClient
from svp.contract import GroundingItem, GroundingRequest, ImageInput
from svp.world.language import reference_captions
from svp.world.scenes import COLOURS, SHAPES, SIZES, Scene, generate_scene

SCENES = [generate_scene("test", i) for i in range(40)]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def absent_phrase(scene: Scene) -> str:
    """A size + colour + shape whose colour + shape is nowhere in the scene."""
    present = {o.kind for o in scene.objects}
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        if f"{colour} {shape}" not in present:
            return f"{SIZES[(scene.index + i) % 2]} {colour} {shape}"
    raise AssertionError("a scene has at most 4 of 24 kinds")


def test_ready_and_backend(shapes_client: GrounderClient) -> None:
    assert shapes_client.health().status == "ok"
    assert shapes_client.ready()


def test_captions_ground_to_the_exact_boxes(shapes_client: GrounderClient) -> None:
    """Every mentioned object present gets its box (IoU >= 0.9); phrases of absent objects get nothing."""
    captions = [
        reference_captions(scene.objects)[scene.index % 5] + f" There is also a {absent_phrase(scene)}."
        for scene in SCENES
    ]
    items = [
        GroundingItem(image=ImageInput.from_bytes(scene.png_bytes()), caption=caption)
        for scene, caption in zip(SCENES, captions, strict=True)
    ]
    response = shapes_client.ground(GroundingRequest(items=items))
    assert response.backend == "shapesworld"
    for scene, result in zip(SCENES, response.results, strict=True):
        absent = absent_phrase(scene)
        assert absent in result.phrases
        assert [b for b in result.boxes if b.label == absent] == []
        for obj in scene.objects:
            assert obj.phrase in result.phrases, (scene.scene_id, result.phrases)
            matches = [b for b in result.boxes if b.label == obj.phrase and iou(b.xyxy, obj.box) >= 0.9]
            assert len(matches) == 1, (scene.scene_id, obj, result.boxes)
        # Nothing else: one box per object, none for words that name no object.
        assert len(result.boxes) == len(scene.objects), (scene.scene_id, result.boxes)


def test_explicit_phrases(shapes_client: GrounderClient) -> None:
    for scene in SCENES[:10]:
        obj = scene.objects[0]
        plural = f"{obj.shape}s"
        request = GroundingRequest(
            items=[GroundingItem(image=ImageInput.from_bytes(scene.png_bytes()), phrases=[plural, absent_phrase(scene)])]
        )
        result = shapes_client.ground(request).results[0]
        want = [o.box for o in scene.objects if o.shape == obj.shape]
        named = [b for b in result.boxes if b.label == plural]
        assert len(named) == len(want)
        for box in want:
            assert any(iou(b.xyxy, box) >= 0.9 for b in named)
        # the absent kind gets at most its best partial match: labelled with only the words that
        # match that object, at no more than half a full match's score
        absent = absent_phrase(scene)
        partial = [b for b in result.boxes if b.label != plural]
        assert len(partial) <= 1
        assert all(set(b.label.split()) < set(absent.split()) and b.score <= 0.5 for b in partial)


def test_score_threshold_applies(shapes_client: GrounderClient) -> None:
    items = [
        GroundingItem(image=ImageInput.from_bytes(scene.png_bytes()), phrases=[o.phrase for o in scene.objects])
        for scene in SCENES[:10]
    ]

    def boxes(threshold: float) -> list[list[tuple[str, tuple[float, ...], float]]]:
        results = shapes_client.ground(GroundingRequest(items=items, box_threshold=threshold)).results
        return [sorted((b.label, b.xyxy, b.score) for b in r.boxes) for r in results]

    everything = boxes(0.0)
    assert [len(b) for b in everything] == [len(scene.objects) for scene in SCENES[:10]]
    assert boxes(1.0) == [[] for _ in items]
    for threshold in sorted({score for item in everything for _, _, score in item})[:3]:
        assert boxes(threshold) == [[b for b in item if b[2] > threshold] for item in everything]


def test_strict_setting_gives_a_wrong_phrase_no_box() -> None:
    """SVP_GROUNDER_SHAPES_PARTIAL_MATCHES=false: a phrase with the wrong shape gets nothing, where
    the default boxes its best partial match (same size and colour, same place)."""
    scene = SCENES[0]
    obj = scene.objects[0]
    wrong_shape = next(s for s in SHAPES if s != obj.shape)
    phrase = f"{obj.size} {obj.colour} {wrong_shape}"
    image, threshold = scene.render(), 0.2
    default = create_engine(Settings(backend="shapesworld")).detect([image], [[phrase]], threshold, 0.25)[0]
    strict = create_engine(Settings(backend="shapesworld", shapes_partial_matches=False)).detect(
        [image], [[phrase]], threshold, 0.25)[0]
    assert [b.label for b in default] == [f"{obj.size} {obj.colour}"] and iou(default[0].xyxy, obj.box) >= 0.9
    assert strict == []


def test_verification_flags_only_the_phrases_of_absent_objects(shapes_client: GrounderClient) -> None:
    """What ``RunCreate.verify`` drops a sample for: grounding a sample's own caption, the phrase of an
    object not in the scene gets no box under its label (a partial match is labelled without the
    wrong word), and every phrase of an object present does."""
    from gateway.inner_loop import unboxed_phrases

    scenes = SCENES[:12]
    captions = [reference_captions(scene.objects)[0] + f" There is also a {absent_phrase(scene)}." for scene in scenes]
    items = [GroundingItem(image=ImageInput.from_bytes(scene.png_bytes()), caption=caption)
             for scene, caption in zip(scenes, captions, strict=True)]
    results = shapes_client.ground(GroundingRequest(items=items)).results
    for scene, caption, result in zip(scenes, captions, results, strict=True):
        assert unboxed_phrases(caption, result) == [absent_phrase(scene)], (scene.scene_id, result)
        # One object introduced twice ("a ... X" at two places) is one box short.
        single = next(o for o in scene.objects if sum(p.phrase == o.phrase for p in scene.objects) == 1)
        doubled = caption + f" Beside it there is a {single.phrase}."
        assert sorted(unboxed_phrases(doubled, result)) == sorted([single.phrase, absent_phrase(scene)])
