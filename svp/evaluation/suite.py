"""The evaluation suite: generate with a model, score with :mod:`svp.evaluation.metrics`.

- :func:`evaluate_world` — ShapesWorld scenes of a split with exact ground truth: captioning
  (base prompt, greedy) against the five references, CHAIR-style object recall and
  hallucination, POPE on its three negative-sampling splits (read from the answers, as POPE does, and
  the AUC of the yes-versus-no margin of the first answer token), REG CIDEr, counting accuracy, and
  optionally the grounded-context check (every object boxed in ``<context>``, how many of the
  boxed objects the caption gets right, on the clean image and with every shape made unreadable).
- :func:`evaluate_coco` — the same captioning and object metrics on real data: a directory of
  images and a COCO captions file (+ an optional COCO instances file for the object metrics).

Results are nested dicts ``{group: {metric: value}}``, written as JSON and printed with
:func:`svp.evaluation.metrics.format_table`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from svp.contract import Box
from svp.evaluation.coco import CategoryMentions, load_captions, load_objects
from svp.evaluation.generation import generate_texts, question_inputs, yes_no_margins
from svp.evaluation.metrics import caption_scores, counting_accuracy, object_scores, ranking_auc, yes_no_scores
from svp.grounding import render_context
from svp.models.loading import LoadedVLM
from svp.world.language import mentioned_objects, reference_captions
from svp.world.probes import POPE_STRATEGIES, count_questions, pope_questions, region_items
from svp.world.scenes import Scene, generate_scenes, obscure_shapes

log = logging.getLogger(__name__)

WORLD_TASKS = ("caption", "pope", "reg", "count", "grounded")
Results = dict[str, dict[str, float]]


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 32
    caption_tokens: int = 96
    """Token limit of a caption (a 4-object caption is ~55 tokens)."""
    answer_tokens: int = 12
    meteor: bool = True
    progress: bool = True


def all_boxed_context(scene: Scene) -> str:
    """Every object of the scene boxed, labelled with its full phrase (the grounded-context check)."""
    return render_context([Box(label=o.phrase, xyxy=o.box) for o in scene.objects])


def caption_images(
    vlm: LoadedVLM, images: Sequence[Image.Image], contexts: Sequence[str] | None, options: EvalOptions,
    temperature: float = 0.0, seed: int = 0, desc: str = "captions",
) -> list[str]:
    """Captions with the base prompt (``contexts is None``) or the grounded prompt with one context per image."""
    prompts = [
        vlm.prompt_inputs(im, "base") if contexts is None else vlm.prompt_inputs(im, "grounded", contexts[i])
        for i, im in enumerate(images)
    ]
    return generate_texts(vlm, prompts, options.caption_tokens, options.batch_size, temperature, seed, desc,
                          options.progress)


def _answers(vlm: LoadedVLM, images: dict[str, Image.Image], items: Sequence[tuple[str, str]],
             options: EvalOptions, desc: str, max_tokens: int | None = None) -> list[str]:
    prompts = [question_inputs(vlm, images[scene_id], question) for scene_id, question in items]
    return generate_texts(vlm, prompts, max_tokens or options.answer_tokens, options.batch_size, desc=desc,
                          progress=options.progress)


def evaluate_world(
    vlm: LoadedVLM, split: str = "test", n_scenes: int = 300, tasks: Sequence[str] = WORLD_TASKS,
    options: EvalOptions = EvalOptions(), adapter: str | None = None, start: int = 0,
) -> tuple[Results, dict[str, list[str]]]:
    """Metrics of the model (with ``adapter`` active, if any) on scenes ``start..start+n-1`` of
    ``split``, and the generated texts by task (for inspection)."""
    unknown = set(tasks) - set(WORLD_TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {', '.join(WORLD_TASKS)}")
    scenes = generate_scenes(split, n_scenes, start=start)
    images = {s.scene_id: s.render() for s in scenes}
    truths = {s.scene_id: Counter(o.kind for o in s.objects) for s in scenes}
    results: Results = {}
    texts: dict[str, list[str]] = {}
    with vlm.use_adapter(adapter):
        if "caption" in tasks:
            caps = caption_images(vlm, list(images.values()), None, options)
            texts["caption"] = caps
            by_id = dict(zip(images, caps, strict=True))
            results["captioning"] = caption_scores(
                by_id, {s.scene_id: reference_captions(s.objects) for s in scenes}, meteor=options.meteor
            )
            results["objects"] = object_scores(by_id, truths, mentioned_objects)
        if "grounded" in tasks:
            contexts = [all_boxed_context(s) for s in scenes]
            caps = caption_images(vlm, list(images.values()), contexts, options, desc="grounded captions")
            texts["grounded"] = caps
            scores = object_scores(dict(zip(images, caps, strict=True)), truths, mentioned_objects)
            # The same prompts on images whose every shape is unreadable: what the caption gets right
            # now came from the context. Clean images cannot tell copying from reading.
            hidden = [Image.fromarray(obscure_shapes(s, s.objects, shape_free=True)) for s in scenes]
            caps = caption_images(vlm, hidden, contexts, options, desc="grounded captions, shapes hidden")
            texts["grounded_shapes_hidden"] = caps
            hidden_scores = object_scores(dict(zip(images, caps, strict=True)), truths, mentioned_objects)
            results["grounded_all_boxed"] = {
                "boxed_object_accuracy": scores["object_recall"],
                "hallucination_rate": scores["hallucination_rate"],
                "shapes_hidden_accuracy": hidden_scores["object_recall"],
            }
        if "pope" in tasks:
            for strategy in POPE_STRATEGIES:
                qs = pope_questions(scenes, strategy)
                prompts = [question_inputs(vlm, images[q.scene_id], q.question) for q in qs]
                answers = generate_texts(vlm, prompts, options.answer_tokens, options.batch_size,
                                         desc=f"POPE {strategy}", progress=options.progress)
                margins = yes_no_margins(vlm, prompts, options.batch_size, f"POPE {strategy} margins", options.progress)
                texts[f"pope_{strategy}"] = answers
                labels = [q.answer for q in qs]
                results[f"pope_{strategy}"] = {**yes_no_scores(answers, labels), "yes_margin_auc": ranking_auc(margins, labels)}
        if "reg" in tasks:
            regs = region_items(scenes)
            answers = _answers(vlm, images, [(r.scene_id, r.question) for r in regs], options, "REG")
            texts["reg"] = answers
            scored = caption_scores(
                {i: a for i, a in enumerate(answers)}, {i: [r.expression] for i, r in enumerate(regs)}, meteor=False
            )
            results["reg"] = {"CIDEr": scored["CIDEr"], "exact_match": sum(
                a.strip().lower().rstrip(".") == r.expression for a, r in zip(answers, regs, strict=True)
            ) / len(regs)}
        if "count" in tasks:
            cqs = count_questions(scenes)
            answers = _answers(vlm, images, [(q.scene_id, q.question) for q in cqs], options, "counting")
            texts["count"] = answers
            results["counting"] = {"accuracy": counting_accuracy(answers, [q.answer for q in cqs])}
    return results, texts


def evaluate_coco(
    vlm: LoadedVLM, captions_file: str | Path, image_root: str | Path, n_images: int | None = None,
    instances_file: str | Path | None = None, options: EvalOptions = EvalOptions(), adapter: str | None = None,
) -> tuple[Results, dict[str, list[str]]]:
    """Captioning metrics (and CHAIR-style object metrics when an instances file is given) on real
    images listed in a COCO captions file; ``file_name`` is relative to ``image_root``."""
    refs = load_captions(captions_file)
    ids = sorted(refs.images)[: n_images or None]
    images = []
    for i in ids:
        with Image.open(Path(image_root) / refs.images[i]) as im:
            images.append(im.convert("RGB"))
    with vlm.use_adapter(adapter):
        caps = caption_images(vlm, images, None, options)
    by_id = dict(zip(ids, caps, strict=True))
    results: Results = {"captioning": caption_scores(by_id, refs.captions, meteor=options.meteor)}
    if instances_file is not None:
        objects, names = load_objects(instances_file, distinct=True)
        results["objects"] = object_scores(by_id, {i: objects.get(i, Counter()) for i in ids}, CategoryMentions(names))
    return results, {"caption": caps}
