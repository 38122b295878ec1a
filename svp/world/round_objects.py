"""How accurate an SVP round's own samples were, on ShapesWorld's unlabelled images.

The adapter of a round learns from its selected grounded samples, so its captions can at best be
as accurate as they are: if the selected samples hallucinate more than the prior samples, the
adapted model will too, whatever the round's size. ShapesWorld can say this because every scene
is a function of its split and index: the demo — the evaluator, not the pipeline, which never
sees labels — regenerates the ground truth of the images a run went over and scores the prior
samples, every grounded sample, and the selected and unselected ones, with the metrics of
:mod:`svp.evaluation.metrics` — and says whether, within an image, the selection score ranks the
samples that hallucinate more above the others.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePosixPath

from svp.contract import ImageResult
from svp.evaluation.metrics import object_counts, object_scores
from svp.world.language import mentioned_objects
from svp.world.scenes import generate_scene

GROUPS = ("prior samples", "grounded samples", "selected", "not selected")
METRICS = ("object_recall", "hallucination_rate", "mentions_per_caption")
_SCENE_FILE = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d+)$")


def scene_truth(image: str) -> Counter[str]:
    """The objects (kinds, with multiplicity) of the ShapesWorld scene an image path names
    (``…/unlabelled-000042.png``)."""
    match = _SCENE_FILE.match(PurePosixPath(image).stem)
    if match is None:
        raise ValueError(f"{image!r} is not a ShapesWorld scene image (<split>-<index>.png)")
    scene = generate_scene(match["split"], int(match["index"]))
    return Counter(o.kind for o in scene.objects)


def round_object_metrics(records: Sequence[ImageResult]) -> dict[str, dict[str, float]]:
    """Per group of samples (:data:`GROUPS`): object recall, hallucination rate, mentions per
    caption and the number of samples, over the round's completed images."""
    groups: dict[str, dict[tuple[int, str, int], str]] = {g: {} for g in GROUPS}
    truths: dict[tuple[int, str, int], Counter[str]] = {}
    for record in records:
        if record.status != "done":
            continue
        truth = scene_truth(record.image)
        for j, text in enumerate(record.prior):
            groups["prior samples"][(record.index, "prior", j)] = text
            truths[(record.index, "prior", j)] = truth
        for candidate in record.candidates:
            key = (record.index, "grounded", candidate.index)
            truths[key] = truth
            groups["grounded samples"][key] = candidate.text
            groups["selected" if candidate.index in record.selected else "not selected"][key] = candidate.text
    out: dict[str, dict[str, float]] = {}
    for name, captions in groups.items():
        scores = object_scores(captions, {k: truths[k] for k in captions}, mentioned_objects)
        out[name] = {m: scores[m] for m in METRICS} | {"samples": float(len(captions))}
    return out


def score_hallucination_correlation(records: Sequence[ImageResult]) -> dict[str, float | None]:
    """Within each image, the Spearman rank correlation between its grounded samples' selection scores
    and their hallucinated mentions; ``spearman`` is its mean over the ``images`` whose scored samples
    differ in both (None if none). Selection is per image, so this is the ranking it acts on: above 0,
    the score keeps the samples that hallucinate more."""
    from scipy.stats import spearmanr

    correlations = []
    for record in records:
        scored = [(c.score, c.text) for c in record.candidates if c.score is not None]
        if record.status != "done" or len(scored) < 2:
            continue
        truth = scene_truth(record.image)
        scores = [score for score, _ in scored]
        hallucinated = [mentions - matched for _, mentions, matched in
                        (object_counts(text, truth, mentioned_objects) for _, text in scored)]
        if len(set(scores)) > 1 and len(set(hallucinated)) > 1:
            correlations.append(float(spearmanr(scores, hallucinated).statistic))
    return {"spearman": sum(correlations) / len(correlations) if correlations else None,
            "images": len(correlations)}


def round_objects_table(metrics: dict[str, dict[str, float]], round_number: int,
                        score_correlation: dict[str, float | None] | None = None) -> str:
    """One row per group of samples of round ``round_number``, then (given) the line of
    :func:`score_hallucination_correlation`."""
    width = max(len(g) for g in metrics)
    head = f"{'samples of the round':<{width}}{'n':>8}" + "".join(f"{m:>22}" for m in METRICS)
    lines = [f"object metrics of round {round_number}'s own samples (its unlabelled images' ground truth)", head, "-" * len(head)]
    for name, row in metrics.items():
        lines.append(f"{name:<{width}}{int(row['samples']):>8}" + "".join(f"{row[m]:>22.3f}" for m in METRICS))
    if score_correlation is not None:
        rho = score_correlation["spearman"]
        lines.append("within an image, selection score vs hallucinated mentions: Spearman "
                     + ("n/a (no image's samples differ in both)" if rho is None else
                        f"{rho:+.3f} (mean over {score_correlation['images']} images; above 0, the score keeps the "
                        "samples that hallucinate more)"))
    return "\n".join(lines)
