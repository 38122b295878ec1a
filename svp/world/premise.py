"""The premise SVP rests on, measured on ShapesWorld: captions sampled with the grounded prompt,
grounded by a detector on the phrases of a prior sample, describe the image better than the
prior samples themselves.

For each scene: ``k`` prior samples with the base prompt; each prior's object phrases
(:func:`svp.grounding.extract_phrases`) go to the detector, whose boxes (after NMS) become the
``<context>`` of one grounded sample of the same image — steps 1-3 of SVP, in process. Object
recall and hallucination are compared over all prior and all grounded samples.
"""

from __future__ import annotations

import logging
from collections import Counter

from svp.evaluation.metrics import object_scores
from svp.evaluation.suite import EvalOptions, caption_images
from svp.grounding import BOX_THRESHOLD, NMS_IOU, extract_phrases, nms, render_context
from svp.models.loading import LoadedVLM
from svp.world.detector import ShapesDetector
from svp.world.language import mentioned_objects
from svp.world.scenes import generate_scenes

log = logging.getLogger(__name__)

def premise_check(
    vlm: LoadedVLM, split: str = "test", n_scenes: int = 100, k: int = 4, temperature: float = 1.0, seed: int = 0,
    options: EvalOptions = EvalOptions(), partial_matches: bool = True,
) -> dict[str, dict[str, float]]:
    """``{"prior": object metrics, "grounded": object metrics, "grounding": box statistics}``;
    ``partial_matches``: the detector's (see :mod:`svp.world.detector`)."""
    scenes = generate_scenes(split, n_scenes)
    detector = ShapesDetector(partial_matches=partial_matches)
    images = [s.render() for s in scenes for _ in range(k)]
    keys = [f"{s.scene_id}/{j}" for s in scenes for j in range(k)]
    truths = {key: Counter(o.kind for o in scenes[i // k].objects) for i, key in enumerate(keys)}
    priors = caption_images(vlm, images, None, options, temperature=temperature, seed=seed, desc="prior samples")
    contexts = []
    n_boxes = 0
    for image, prior in zip(images, priors, strict=True):
        phrases = extract_phrases(prior)
        found = [b for b in detector.detect(image, phrases) if b.score > BOX_THRESHOLD] if phrases else []
        boxes = nms(found, NMS_IOU)
        n_boxes += len(boxes)
        contexts.append(render_context(boxes))
    grounded = caption_images(vlm, images, contexts, options, temperature=temperature, seed=seed + 1,
                              desc="grounded samples")
    return {
        "prior": object_scores(dict(zip(keys, priors, strict=True)), truths, mentioned_objects),
        "grounded": object_scores(dict(zip(keys, grounded, strict=True)), truths, mentioned_objects),
        "grounding": {"boxes_per_sample": n_boxes / len(keys), "samples": float(len(keys))},
    }
