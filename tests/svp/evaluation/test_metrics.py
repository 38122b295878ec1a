import json
from collections import Counter

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from svp.evaluation.coco import CategoryMentions, load_captions, load_objects
from svp.evaluation.metrics import (
    caption_scores,
    counting_accuracy,
    object_scores,
    ranking_auc,
    read_number,
    read_yes_no,
    yes_no_scores,
)
from svp.world.export import export_split
from svp.world.language import mentioned_objects


def test_chair_on_a_caption_with_a_known_hallucination():
    truth = {1: Counter({"red diamond": 1, "green triangle": 1})}
    caption = {1: "In the image, at the top there is a small red diamond. At the bottom there is a large blue circle."}
    scores = object_scores(caption, truth, mentioned_objects)
    assert scores["object_recall"] == pytest.approx(1 / 2)
    assert scores["hallucination_rate"] == pytest.approx(1 / 2)
    assert scores["caption_hallucination_rate"] == 1.0


def test_chair_counts_duplicates_and_bare_shapes_over_a_corpus():
    truths = {1: Counter({"red circle": 2}), 2: Counter({"blue square": 1, "green circle": 1})}
    captions = {
        1: "In the image, there are three red circles.",  # 2 right, 1 invented
        2: "In the image, there is a circle. The circle is left of a blue square.",  # bare shape matches
    }
    s = object_scores(captions, truths, mentioned_objects)
    # truth 4 objects, mentions 3 + 2 = 5, matched 2 + 2 = 4
    assert s["object_recall"] == pytest.approx(4 / 4)
    assert s["hallucination_rate"] == pytest.approx(1 / 5)
    assert s["caption_hallucination_rate"] == pytest.approx(1 / 2)
    assert s["mentions_per_caption"] == pytest.approx(5 / 2)


def test_pope_scores_on_a_fixed_answer_list():
    answers = ["Yes", "No", "yes.", "No, there is not.", "Yes, there is a red circle."]
    labels = ["yes", "yes", "no", "no", "no"]
    # predictions yes, no, yes, no, yes -> tp 1, fn 1, fp 2, tn 1
    s = yes_no_scores(answers, labels)
    assert s["accuracy"] == pytest.approx(2 / 5)
    assert s["precision"] == pytest.approx(1 / 3)
    assert s["recall"] == pytest.approx(1 / 2)
    assert s["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert s["yes_ratio"] == pytest.approx(3 / 5)
    assert read_yes_no("There is not a red circle.") == "no"
    with pytest.raises(ValueError):
        yes_no_scores(["yes"], [])


def test_ranking_auc_by_hand_and_against_mann_whitney():
    # yes scores {0.9, 0.5}, no scores {0.1, 0.5}: 0.9 beats both, 0.5 beats 0.1 and ties 0.5 -> 3.5 / 4
    assert ranking_auc([0.9, 0.1, 0.5, 0.5], ["yes", "no", "yes", "no"]) == pytest.approx(0.875)
    assert ranking_auc([1.0, 1.0], ["yes", "no"]) == 0.5
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # rounded: ties happen
    labels = ["yes" if x else "no" for x in rng.random(60) < 0.5]
    pos = [s for s, g in zip(scores, labels, strict=True) if g == "yes"]
    neg = [s for s, g in zip(scores, labels, strict=True) if g == "no"]
    u = mannwhitneyu(pos, neg).statistic
    assert ranking_auc(list(scores), labels) == pytest.approx(u / (len(pos) * len(neg)))
    with pytest.raises(ValueError):
        ranking_auc([0.3], ["yes"])


def test_counting():
    assert read_number("There are 3 circles") == 3 and read_number("two") == 2 and read_number("none") is None
    assert counting_accuracy(["2", "three", "no idea", "1"], ["2", "3", "0", "4"]) == pytest.approx(2 / 4)


def test_caption_scores_match_hand_computed_values_and_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    preds = {1: "a red circle", 2: "a blue square on the left"}
    refs = {1: ["a blue circle"], 2: ["a blue square on the left", "there is a blue square"]}
    s = caption_scores(preds, refs, meteor=False)
    # hand-computed on image 1: unigram precision 2/3, no shared bigram, LCS 2 of 3 words
    one = caption_scores({1: preds[1]}, {1: refs[1]}, meteor=False)
    assert one["Bleu_1"] == pytest.approx(2 / 3, abs=1e-6)
    assert one["Bleu_2"] < 1e-4
    assert one["ROUGE_L"] == pytest.approx(2 / 3, abs=1e-6)
    # pycocoevalcap's own scorers on the same (already lower-case, punctuation-free) text
    gts = {k: v for k, v in refs.items()}
    res = {k: [v] for k, v in preds.items()}
    assert s["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert s["Bleu_4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    with pytest.raises(ValueError):
        caption_scores({3: "x"}, refs, meteor=False)


def test_meteor_runs_through_java():
    good = caption_scores({1: "a blue square on the left"}, {1: ["a blue square on the left"]})
    bad = caption_scores({1: "a red circle"}, {1: ["a blue square on the left"]})
    assert 0.9 < good["METEOR"] <= 1.0 and bad["METEOR"] < good["METEOR"]


def test_coco_reference_files_of_an_export(tmp_path):
    out = export_split("test", 4, tmp_path, progress=False)
    refs = load_captions(out / "captions_coco.json")
    assert sorted(refs.images) == [0, 1, 2, 3] and all(len(c) == 5 for c in refs.captions.values())
    objects, names = load_objects(out / "instances_coco.json")
    scenes = json.loads((out / "scenes.json").read_text())
    assert objects[0] == Counter(f"{o['colour']} {o['shape']}" for o in scenes[0]["objects"])
    # the real-data parser (category names, set semantics) reads the same objects from a reference
    parse = CategoryMentions(names)
    assert parse(refs.captions[0][0]) == Counter(set(objects[0]))


def test_category_mentions_prefers_longer_names_and_plurals():
    parse = CategoryMentions(["dog", "hot dog", "bus"])
    assert parse("A hot dog and two dogs near the buses.") == Counter({"hot dog": 1, "dog": 1, "bus": 1})
