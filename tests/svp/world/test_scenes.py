import json
from collections import Counter

import numpy as np
import pytest

from svp.world.export import export_split
from svp.world.language import canonical_caption, mentioned_objects, reference_captions
from svp.world.probes import POPE_STRATEGIES, count_questions, pope_questions, region_items
from svp.world.scenes import CELL, IMAGE_SIZE, SPLITS, generate_scene, generate_scenes, scene_seed


def test_same_seed_same_bytes_and_different_indices_differ():
    a = generate_scene("test", 7).png_bytes()
    assert a == generate_scene("test", 7).png_bytes()
    assert a != generate_scene("test", 8).png_bytes()
    assert a != generate_scene("test", 7, world_seed=1).png_bytes()


def test_splits_are_disjoint():
    seeds = {split: {tuple(scene_seed(split, i).generate_state(4)) for i in range(300)} for split in SPLITS}
    assert not seeds["train"] & seeds["test"]
    assert not seeds["train"] & seeds["unlabelled"]
    assert not seeds["unlabelled"] & seeds["test"]
    images = {split: {generate_scene(split, i).png_bytes() for i in range(50)} for split in SPLITS}
    assert not images["train"] & images["test"] and not images["unlabelled"] & images["test"]
    assert generate_scene("train", 3).scene_id == "train-000003"


def test_ground_truth_boxes_are_exact_pixel_extents_and_objects_never_overlap():
    for scene in generate_scenes("train", 40):
        img = np.asarray(scene.render()).astype(int)
        assert 1 <= len(scene.objects) <= 4
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            x1, y1, x2, y2 = (round(c * IMAGE_SIZE) for c in o.box)
            row, col = o.cell
            # inside its own cell, so boxes of different objects cannot overlap
            assert col * CELL <= x1 < x2 <= (col + 1) * CELL and row * CELL <= y1 < y2 <= (row + 1) * CELL
            crop = img[y1:y2, x1:x2]
            far = np.abs(crop - np.array(scene.background)).sum(-1) > 60
            # every border row/column of the box holds object pixels: the box is tight
            assert far[0].any() and far[-1].any() and far[:, 0].any() and far[:, -1].any()


def test_relations_follow_cells():
    scene = next(s for s in generate_scenes("train", 50) if len(s.objects) >= 3)
    for r in scene.relations:
        a, b = scene.objects[r.subject].cell, scene.objects[r.object].cell
        assert {"left of": a[1] < b[1], "right of": a[1] > b[1], "above": a[0] < b[0], "below": a[0] > b[0]}[r.relation]


def test_captions_start_in_the_image_and_mention_exactly_the_objects():
    for scene in generate_scenes("test", 30):
        truth = Counter(o.kind for o in scene.objects)
        refs = reference_captions(scene.objects)
        assert len(refs) == 5 and len(set(refs)) == 5
        for ref in refs:
            assert ref.startswith("In the image, ")
            assert mentioned_objects(ref) == truth, ref


def test_canonical_caption_is_position_first():
    scene = generate_scene("test", 3)
    assert canonical_caption(scene.objects) == (
        "In the image, at the top there is a small red diamond. At the bottom there is a small green triangle."
    )


def test_mention_parser_counts_numbers_and_skips_back_references():
    caption = "In the image, there are two red circles and a blue square. The blue square is below a circle."
    assert mentioned_objects(caption) == Counter({"red circle": 2, "blue square": 1, "circle": 1})


def test_pope_balanced_and_negatives_absent():
    scenes = generate_scenes("test", 40)
    by_id = {s.scene_id: s for s in scenes}
    for strategy in POPE_STRATEGIES:
        qs = pope_questions(scenes, strategy)
        answers = Counter(q.answer for q in qs)
        assert answers["yes"] == answers["no"] > 0
        for q in qs:
            present = {o.kind for o in by_id[q.scene_id].objects}
            assert (q.kind in present) == (q.answer == "yes")
            assert q.question.startswith("Is there a")
    # adversarial negatives share an attribute with something present; random ones often don't
    adv = [q for q in pope_questions(scenes, "adversarial") if q.answer == "no"]
    for q in adv:
        colour, shape = q.kind.split()
        assert any(o.colour == colour or o.shape == shape for o in by_id[q.scene_id].objects)


def test_reg_and_counting_probes():
    scenes = generate_scenes("test", 20)
    regs = region_items(scenes)
    assert len(regs) == sum(len(s.objects) for s in scenes)
    assert regs[0].question.startswith("Please provide a short description for this region: [0.")
    counts = count_questions(scenes)
    assert len(counts) == 2 * len(scenes)
    assert counts[0].answer == str(len(scenes[0].objects))


@pytest.mark.parametrize("split", ["test", "unlabelled"])
def test_export_layout(tmp_path, split):
    out = export_split(split, 6, tmp_path / split, progress=False)
    manifest = (out / "manifest.txt").read_text().split()
    assert len(manifest) == 6 and all((out / p).is_file() for p in manifest)
    if split == "unlabelled":
        assert not (out / "scenes.json").exists() and not (out / "captions_coco.json").exists()
        return
    coco = json.loads((out / "captions_coco.json").read_text())
    assert len(coco["images"]) == 6 and len(coco["annotations"]) == 30
    inst = json.loads((out / "instances_coco.json").read_text())
    assert len(inst["annotations"]) == sum(len(s["objects"]) for s in json.loads((out / "scenes.json").read_text()))
    for name in ("pope_random", "pope_popular", "pope_adversarial", "reg", "counting"):
        assert json.loads((out / f"{name}.json").read_text())


def test_small_objects_roam_their_cell_and_large_ones_stay_near_its_centre():
    # Where perception is meant to be hard (small shapes anywhere in a cell) and where it is not.
    offsets: dict[str, list[int]] = {"small": [], "large": []}
    for scene in generate_scenes("train", 300):
        for o in scene.objects:
            centre_x = o.cell[1] * CELL + (CELL - o.side) // 2
            offsets[o.size].append(o.origin[0] - centre_x)
    assert max(abs(d) for d in offsets["large"]) <= 3
    assert max(offsets["small"]) - min(offsets["small"]) >= 14
