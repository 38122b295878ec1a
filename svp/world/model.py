"""The ShapesWorld base VLM: a small model of the real LLaVA architecture trained from scratch on CPU.

Architecture (built by :func:`svp.models.tiny.build_tiny_vlm`, saved with ``save_pretrained``,
loaded with :func:`svp.models.loading.load_vlm` like any checkpoint): a CLIP vision tower on
96 x 96 images with 32-pixel patches — one patch is one cell of the scene's 3 x 3 grid — a GELU
projector, and a Llama decoder, with a word-level tokenizer over the domain's words and the
paper's prompts (``llava_v1`` chat format).

Recipe, on the ``train`` split only:

1. Vision pre-training (real VLMs start from a pretrained encoder): the vision tower alone learns
   to tell, from the features LLaVA feeds the projector (second-to-last layer, one per patch),
   whether each cell holds an object, its shape, colour and size, and which cell it is.
2. Instruction tuning of projector + decoder (vision tower frozen, as LLaVA does), loss on the
   answer tokens only, on a mix of the paper's prompt formats:

   - ``base``: sampling system prompt + base prompt -> the canonical position-first caption, which
     in a crowded scene (3+ objects) mostly leaves the small objects out, as human captions name a
     scene's salient things: the base model misses small objects, as real VLMs do;
   - ``grounded``: grounded system prompt + ``<context>`` of boxes + base prompt -> the caption of
     *every* object. The context is always true — labelled with the object's phrase ("large red
     circle" or "red circle"), ground-truth box with a little jitter — but often partial (a
     random subset, sometimes empty), as when a detector grounds a prior caption: what is boxed
     is certain, what is not must still be seen. Nothing boxed is ever absent from the answer
     and nothing absent is ever boxed, so the model learns that grounding can be trusted. In a
     share of these examples the boxed objects are blurred in the image (place, rough size and
     colour still visible, outline not), so their shape can only be read from the context — a
     detector naming what the model cannot make out. (Without them the model, which reads clean
     shapes well, never needs the context: its all-boxed captions were no better than its base ones.)
   - ``pope`` / ``count`` / ``reg``: the probe questions (user turn only, no system prompt, as
     LLaVA's instruction data and :mod:`svp.training` render VQ pairs; the question before or after
     the image) -> short answers, their tokens weighted up in the second half of training.

3. POPE beside captions. The decoder learns to answer "Is there a red circle in the image?" with
   auxiliary heads at the answer position that give the question's kind and the scene's kinds
   their own signals (stage 2 alone leaves POPE at chance); the captions pay a little for it (see
   ``WorldModelConfig.probe_steps``).

The budget (steps x batch) is deliberately small: the result is a real but imperfect describer,
the kind of model SVP adapts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration

from svp.contract import Box
from svp.grounding import render_context
from svp.models.tiny import build_tiny_vlm
from svp.models.tokenizer import build_word_tokenizer
from svp.prompts import PAPER_PROMPTS, build_messages
from svp.world.language import canonical_caption, domain_words, region_expression
from svp.world.probes import POPE_STRATEGIES, count_questions, pope_questions, region_question
from svp.world.scenes import (
    COLOURS,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    generate_scenes,
    obscure_shapes,
)

log = logging.getLogger(__name__)

CHAT_FORMAT = "llava_v1"
TASKS = ("base", "grounded", "pope", "count", "reg")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class WorldModelConfig:
    """How the base VLM is built and trained. ``full()`` is ``svp world build``'s; ``ci()`` the tests'."""

    train_scenes: int = 6000
    """Scenes of the ``train`` split the model learns from (indices 0..n-1)."""
    vision_steps: int = 2000
    """Stage 1: vision-tower pre-training steps."""
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    vision_warmup_steps: int = 100
    """Stage 1 warms its learning rate up, decays it by cosine and clips gradients at norm 1. At a
    constant 2e-3 from the first step, unclipped, the tower could collapse to reading only where a
    cell is, not what is in it: a fresh build on an AMD EPYC ended stage 1 at loss 4.485, the
    entropy of the attribute priors, and its decoder then called every object a "triangle"."""
    steps: int = 1400
    """Stage 2: instruction-tuning steps (projector + decoder) of the task mix, beside ``copy_steps``.
    A fixed count, and a schedule that follows steps, not time: a build is a function of its configuration, whatever the machine."""
    batch_size: int = 32
    lr: float = 1.5e-3
    warmup_steps: int = 50
    lr_floor: float = 0.0
    """Stage 2's learning rate ends at ``lr_floor`` x ``lr`` (cosine from ``lr``; stage 1 ends at 0.1 x).
    Annealed to 0 with ``full_context_share`` 0.6 (see there)."""
    weight_decay: float = 0.01
    task_weights: tuple[tuple[str, float], ...] = (
        ("base", 0.30),
        ("grounded", 0.45),
        ("pope", 0.13),
        ("count", 0.06),
        ("reg", 0.06),
    )
    """Sampling probability of each training task."""
    token_weights: tuple[tuple[str, float], ...] = (("pope", 10.0), ("count", 10.0), ("reg", 3.0))
    """Loss weight of each answer token of a task (1 if unlisted). A probe's answer is one or two
    words against a caption's ~35 tokens: unweighted, the yes/no token of POPE was ~1 % of the
    gradient and the model answered "No" to everything."""
    token_weights_from: float = 0.5
    """Share of stage 2 after which ``token_weights`` apply (before it every token weighs 1). Heavy
    probe weights from the first step kept the decoder from learning to read shapes at all (every
    object a "triangle", context ignored, in 3 builds of 3); the probes build on captions learned first."""
    sizes: dict[str, Any] = field(
        default_factory=lambda: dict(
            image_size=IMAGE_SIZE,
            patch_size=IMAGE_SIZE // GRID,
            vision_hidden_size=128,
            vision_intermediate_size=512,
            vision_layers=3,
            vision_heads=4,
            hidden_size=192,
            intermediate_size=512,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            max_position_embeddings=1024,
        )
    )
    """:class:`svp.models.tiny.TinySizes` overrides."""
    bf16: bool = False
    """bfloat16 autocast for the decoder's matmuls (float32 weights and optimiser; the vision path
    stays float32). Off by default: on both CPUs with native bfloat16 it was measured on, a model
    this small trains faster in float32. bench/bench_world_build.py on a 2-core Intel Xeon with AMX,
    stage 2 at s/step: float32 0.587 (one pass per prompt) and 0.490 (length passes), bf16 0.796 and
    0.870-0.975; on a 2-core AMD EPYC with avx512_bf16, whole builds ran stage 2 at 1.38-1.51 it/s
    in float32 and 1.19-1.25 in bf16. On a CPU without it (AVX2 only) bfloat16 is emulated and ~15x
    slower than float32."""
    full_context_share: float = 0.6
    """Share of grounded examples with every object boxed (the rest: a random subset, a few none).
    With every object boxed, a model that misses gets one sentence's phrase wrong by repeating the one
    before it instead of reading its own context entry (seed 3, float32: all-boxed accuracy 0.83 on
    300 test scenes at 0.45, falling from 0.97 on one-object scenes to 0.80 on four). At 0.6, with
    ``lr_floor`` 0 (it was 0.1), seeds 0-4 (300 test scenes) went: all-boxed mean 0.897 -> 0.904 and
    worst 0.836 -> 0.873, hallucination mean 0.113 -> 0.092, recall mean 0.675 -> 0.686 — but seed 2
    fell 0.923 -> 0.894 and seed 4 0.918 -> 0.899: between seeds the spread (0.87-0.93) is still larger
    than what the change moved."""
    obscured_boxed_ratio: float = 0.5
    """Share of grounded examples whose boxed objects keep colour, size and place in the image but
    lose their outline (blurred over their cell): the shape is best read from the context.

    Whether the decoder copies from its context shows in ``svp eval``'s all-boxed accuracy with every
    shape unreadable (``shapes_hidden_accuracy``; chance 0.25). Seed 4, bf16, stage 2 alone, 300 test
    scenes, one run each:

    - every grounded example behind the system prompt: 0.27 (clean all-boxed 0.911) — it read shapes
      from the image only (a lone boxed "small green diamond", blurred, captioned "square"); neither
      shape-free obscuring (0.27) nor shape words weighted 8x (0.30; from step 0 the decoder stalled)
      changed that;
    - half of them in a bare turn (``bare_grounded_share``): 0.766 (clean 0.930);
    - the same with obscured objects drawn shape-free (``obscure_shapes(shape_free=True)``): 0.291
      (clean 0.919). The copy formed in one run and not in the other: in stage 2's budget it is
      learned or not by chance, so the blurred outline, which gave the run that copied, stays."""
    copy_steps: int = 300
    copy_from: int = 300
    """At step ``copy_from`` of the task mix, stage 2 pauses it for ``copy_steps`` steps of ``grounded``
    examples alone, each boxed object drawn shape-free (:func:`obscure_shapes`), so its shape is only
    in the context: the decoder learns to copy from its grounding. In the mix the copy formed or not
    by chance: all-boxed accuracy with every shape hidden (chance 0.25) was 0.47-0.53 in two full
    builds and 0.24-0.29 in three, where on grounded examples alone a fresh decoder copied every shape
    word right from step 300 (see ``bare_grounded_share``). The phase comes once the decoder reads the
    image (``copy_from`` = ``stall_check_step``): opening stage 2 with it, a fresh decoder learned that
    shapes come from the context, and seed 1 failed the stall check three times (shape loss at 1.02,
    0.92 of chance). With the phase here and contexts in random order (:func:`training_grounding`),
    full builds from empty roots (float32, 300 test scenes), seeds 0 and 1: all-boxed 0.923 and 0.925
    (every earlier build 0.877-0.883), shapes hidden 0.893 and 0.695; seed 2 0.930 / 0.634 (it failed
    the gate on POPE, 0.643); seed 3 0.886 / 0.397 — where the copy stays weak, all-boxed stays under
    0.90, and the gate now refuses it (``GateThresholds.min_all_boxed_shapes_hidden``). Seed 4 on a
    2-core AVX2 AMD EPYC: 0.910 / 0.612; seed 0 there: 0.956 / 0.926. 0 leaves the phase out."""
    busy_scene_objects: int = 3
    omit_small_in_busy: float = 0.8
    """Probability that a ``base`` training caption of a scene with at least ``busy_scene_objects``
    objects leaves out each small one — as human captions (COCO's) name a crowded scene's salient
    things — so the base model misses small objects as real VLMs do. ``grounded`` answers always
    name every object: with grounding, the model describes what it would otherwise skip."""
    bare_caption_share: float = 0.5
    """Share of ``base`` captions asked in a bare user turn — the base prompt with no system prompt,
    as LLaVA's instruction data asks for descriptions. Behind the ~75-word Appendix F system prompt
    the 10 image tokens are a twentieth of what a caption token can attend to; in a bare turn they
    are a third, and a randomly initialised decoder finds the image there first. Without them,
    whether and when the decoder started to read the image was a matter of seed: v4's seed 3
    (float32) still named shapes and colours at chance at step 400, and seeds 3 and 4 failed the gate
    (see ``stall_check_step``)."""
    bare_grounded_share: float = 0.5
    """Share of ``grounded`` examples asked in a bare user turn — image, ``<context>`` and base prompt,
    no system prompt — for the reason ``bare_caption_share`` gives: behind the system prompt the
    context is a quarter of what a caption token attends to, and the decoder never learned to copy
    from it. Fresh projector and decoder on seed 4's tower, stage 2 on grounded examples only (every
    object boxed and drawn shape-free, so the context alone names shapes), 64 held-out test scenes,
    teacher-forced shape-word accuracy in the Appendix F grounded prompt: at share 0 it stayed at
    0.19-0.29 for 400 steps (answer loss 0.28); at 0.5 it was 0.62 at step 200 and 1.00 from step 300
    (loss 0.065) — learned in the bare turn, used behind the system prompt. The same decoder on the
    context and caption as plain text, no prompt around them, copies at 0.96 by step 100."""
    simple_scene_steps: int = 200
    simple_scene_objects: int = 2
    """For the first ``simple_scene_steps`` steps, captions and region questions are drawn from scenes
    with at most ``simple_scene_objects`` objects: where one or two cells differ from the background,
    attending to any changed cell already tells what to say, and the decoder learns to look before
    it must learn where."""
    stall_check_step: int = 300
    stall_loss_ratio: float = 0.8
    max_decoder_restarts: int = 2
    """At step ``stall_check_step`` of stage 2 the decoder's held-out loss on the shape and colour
    words of captions (among their class: chance is ln 4 and ln 6) must be below ``stall_loss_ratio``
    of chance for both. If not, the decoder has not found the image yet — it may never, and a later
    gate would only throw the whole build away — so projector and decoder start again from the next
    initialisation (the trained tower kept), up to ``max_decoder_restarts`` times. 0 disables the check."""
    probe_question_first: float = 0.5
    """Share of probe examples with the question before the image, as in LLaVA's instruction data,
    where ``<image>`` opens or closes the first turn at random: image tokens that come after the
    question can already look for what it asks about."""
    presence_token: bool = True
    """Give the decoder CLIP's CLS token too (LLaVA's ``vision_feature_select_strategy="full"``),
    pre-trained to say which colour-shape kinds the scene holds. From per-cell features alone the
    decoder never learned POPE: at the answer position a linear probe read yes/no at 0.52-0.59
    (V3, 800 balanced test questions), because "is there a red circle" asks for a conjunction that
    one attention score over cells cannot test. From V3, 800 POPE-heavy fine-tuning steps took
    balanced POPE accuracy 0.50 -> 0.57 with this token and left it at chance without. In full v4
    builds (13 % POPE examples) it is not enough: POPE stays at 0.49-0.50 (seeds 0 and 1), while
    the held-out presence read-out of CLS is 0.988 — the decoder does not yet use it. Nor is it the task
    mix: on a seed-0 tower, stage 2 with *only* POPE examples (float32, 1744 held-out random and
    adversarial questions) collapsed to one answer per question at this ``lr`` (0.50 from step 300),
    and at 5e-4 or 2.5e-4 rose to 0.55-0.60 by step 400-600 and stayed there (random, adversarial and
    popular alike: 0.56/0.55/0.57): with one bit per example the lookup is not learned in a build's budget.
    Nor did more bits per example or easier questions help (seed-0 tower, 200 held-out scenes, all at
    chance, 0.42-0.57 on every split): 8 questions per conversation (300 steps at 5e-4 and 1.5e-3); half of them
    single-attribute ("Is there a circle ...", 700 steps at 1e-3); and, on a fully built model, 50 % POPE
    beside captions (100 steps), or 30 % POPE with 30 % REC ("the bounding box of ... a red circle",
    which should teach a query-by-phrase over the cells; 300 steps). In a built model the answer position attends
    to the image (half its last layer's attention) but its yes-no margin ranks nothing (AUC 0.50):
    "yes" needs a product of the question's words and the image that no first-order gradient starts.
    A "where is the red circle" task (answer: its position, or "There is no red circle.") beside POPE,
    on a built seed-0 model, is learned (9-way accuracy 0.10 -> 0.63 in 600 steps) — finding the
    best-matching cell needs only an additive colour + shape score — while POPE stays at 0.50: a
    presence answer also needs the conjunction "red AND circle" formed before it meets the image.
    Stage 3 forms it (``probe_steps``): probes at the answer position make the question's kind and
    the scene's kinds (gathered from this token) first-order targets."""
    probe_steps: int = 600
    probe_lr: float = 1e-3
    probe_lr_floor: float = 0.0
    probe_warmup_steps: int = 20
    probe_captions: int = 16
    probe_base_share: float = 0.2
    probe_questions: int = 16
    probe_counts: int = 4
    """Count questions ("How many objects ...") among stage 3's captions, their answer tokens weighted
    as in stage 2 (``token_weights``). Without them stage 3 taught every question a yes/no answer:
    counting accuracy was 0.000 on 300 test scenes in every full build measured (seeds 0, 1, 2, 4), the model
    answering "Yes" or "No" to "How many ...?"."""
    probe_question_weight: float = 6.0
    answer_probe_layer: int = 2
    answer_probe_weight: float = 1.0
    """Stage 3, POPE with answer-position probes: ``probe_steps`` steps (``probe_lr`` after its warm-up,
    cosine down to ``probe_lr_floor`` x ``probe_lr``) of ``probe_captions`` caption examples (a
    ``probe_base_share`` of them base, the rest grounded, as stage 2 draws them; with them
    ``probe_counts`` count questions) and ``probe_questions`` POPE questions, whose mean answer loss weighs ``probe_question_weight`` (the
    mean runs over the yes/no word and its end-of-turn token: 6 puts 3 on the word). Beside
    it, auxiliary heads on the decoder's state after layer ``answer_probe_layer`` at each question's
    answer position (its last prompt token) — trained with weight ``answer_probe_weight``, then
    discarded — say which kinds the scene holds and which kind the question asks about.

    "Is there a red circle" is a *cubic* function of what the decoder starts with: (colour word) x
    (shape word) x (presence in the image). A gradient reaches such a product only once two of its
    factors exist (see ``presence_token``). The heads give the asked kind and the scene's kinds at the
    answer position their own first-order signals; what is left for the answer is their dot product,
    a quadratic that one gated MLP layer learns. Continuing the built seed-0 v4 model (150 held-out
    scenes): the asked kind was read at 1.00 by step 200, the asked kind's presence (AUC) 0.50 ->
    0.97 by step 600, and POPE accuracy rose from 0.50 to 0.82 / 0.75 / 0.75 (random / popular /
    adversarial). The same heads inside stage 2 (every example's scene kinds, POPE's asked kind, from
    a quarter of the way) cost the captions what POPE gained too slowly: seed 0 failed the gate with
    all-boxed 0.780 and POPE 0.54.

    On seed 0 (bf16, 100 held-out gate scenes, stage 3 run on the stage-2 model of an empty-root
    build; stage 2 alone: all-boxed 0.886, recall 0.686, hallucination 0.120, POPE 0.50), what POPE
    gains costs the captions, depending on the mix:

    - 600 steps, 16 captions + 16 questions, constant lr 1e-3 (a full build): POPE accuracy (lowest
      split) 0.795, AUC 0.873; all-boxed 0.780, recall 0.589, hallucination 0.228;
    - the same, lr cosine to 0: POPE 0.790, AUC 0.880; all-boxed 0.835, recall 0.678, hallucination 0.167;
    - 24 captions + 8 questions: POPE 0.640, AUC 0.672; all-boxed 0.856, recall 0.691, hallucination 0.155;
    - 16 + 16 as above, lr cosine, all captions grounded: POPE 0.714, AUC 0.790; all-boxed 0.869, recall
      0.576, hallucination 0.295;
    - the same with a fifth of them base (``probe_base_share`` 0.2): POPE 0.705, AUC 0.815; all-boxed
      0.873, recall 0.720, hallucination 0.167.

    The last is the default. Full builds from empty roots with it, 300 test scenes (POPE accuracy
    random / popular / adversarial; the issue-21 note has every seed's row): seed 0 (bf16) POPE
    0.881 / 0.864 / 0.841, F1 0.888 / 0.873 / 0.855; recall 0.648, hallucination 0.175, all-boxed
    0.878 — stop 34's seed-0 build, stage 2 alone, on the same scenes: POPE 0.50, recall 0.685,
    hallucination 0.093, all-boxed 0.911. Seed 1 (bf16) failed the gate on all-boxed, 0.758 (POPE 0.852), and its stage-2 model alone
    already did (0.843, POPE 0.500): stage 3 cost it 0.02-0.09 of all-boxed in four runs (lr 5e-4 or a
    question weight of 3 no better than noise); a build would go on to its next attempt's seed, as the gate means it to.
    Seed 2 (bf16) passed it: POPE 0.770 / 0.664 / 0.696, F1 0.797 / 0.727 / 0.746; recall 0.736,
    hallucination 0.108, all-boxed 0.932 (18.4 min). Seed 4 (float32) failed it on all-boxed, 0.801
    (POPE 0.798), in 24 min on a slower 2-core AMD EPYC; the same seed built in bf16 (a lab run of
    stages 1-2, then stage 3) passed (all-boxed 0.890, POPE 0.695): a seed passes or fails at the margin.
    ``--pope-steps 0`` builds without it.
    """
    threads: int = 2
    """torch threads: speed only — steps, data and schedule are the same for any count (float sums
    may round differently). Alone on a 2-core machine, stage 2 ran
    0.78 s a step with two and 1.19 s with one; on a machine shared with other work one is faster."""
    seed: int = 0

    @classmethod
    def full(cls) -> WorldModelConfig:
        return cls()

    @classmethod
    def ci(cls) -> WorldModelConfig:
        """Seconds-scale: the same code on a few hundred scenes and a few dozen steps."""
        small = dict(cls().sizes, vision_hidden_size=32, vision_intermediate_size=64, vision_layers=2,
                     hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
        return cls(train_scenes=300, vision_steps=20, vision_batch_size=32, vision_warmup_steps=2, steps=30,
                   batch_size=8, lr=3e-3, warmup_steps=5, copy_steps=6, copy_from=10, simple_scene_steps=10, stall_check_step=0, probe_steps=8,
                   probe_warmup_steps=2, probe_captions=4, probe_questions=4, sizes=small)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def world_tokenizer() -> Any:
    """The word-level tokenizer: domain words, the Appendix F prompts' words, and 2-decimal coordinates."""
    prompt_text = " ".join(
        [PAPER_PROMPTS.system_sampling, PAPER_PROMPTS.system_grounded, PAPER_PROMPTS.base, PAPER_PROMPTS.grounded]
    )
    # render_context writes "0.37": the pieces "0", ".", "37" — every two-digit fraction is one word.
    coordinates = ["0", "1", "."] + [f"{i:02d}" for i in range(100)]
    return build_word_tokenizer([prompt_text, *domain_words(), *coordinates], CHAT_FORMAT)


# ---------------------------------------------------------------- prompts as the model sees them


def question_messages(question: str, answer: str | None = None, image_first: bool = True) -> list[dict[str, Any]]:
    """A probe as a plain user turn with the image (no system prompt), optionally answered."""
    content: list[dict[str, Any]] = [{"type": "image"}, {"type": "text", "text": question}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": content if image_first else content[::-1]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class PromptEncoder:
    """Token ids of prompts and answers exactly as the processor builds them at inference
    (chat template, ``<image>`` expanded to the model's image tokens, BOS once)."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # LlavaProcessor's own count: patches, plus CLS, minus CLS again under the "default" strategy.
        size = int(processor.image_processor.crop_size["height"])
        self.image_tokens = (size // int(processor.patch_size)) ** 2 + int(processor.num_additional_image_tokens) - (
            1 if processor.vision_feature_select_strategy == "default" else 0
        )
        self._cache: dict[str, list[int]] = {}

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        text = str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        image = self.processor.image_token
        expanded = text.replace(image, image * self.image_tokens)
        bos = self.tokenizer.bos_token
        ids = [int(t) for t in self.tokenizer(expanded, add_special_tokens=not text.startswith(bos))["input_ids"]]
        if len(self._cache) < 4096:
            self._cache[text] = ids
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens and the end-of-turn token the template writes after it."""
        return [int(t) for t in self.tokenizer(answer, add_special_tokens=False)["input_ids"]] + [
            int(self.tokenizer.eos_token_id)
        ]


def pixel_tensor(images: list[Image.Image] | np.ndarray, processor: Any) -> torch.Tensor:
    """CLIP-normalised pixels [N, 3, H, W] of images already at the model's size (what the processor
    computes, without per-image PIL work: resize and crop are identities at 96 x 96)."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]) if isinstance(images, list) else images
    ip = processor.image_processor
    x = torch.from_numpy(arr).float().permute(0, 3, 1, 2) * float(ip.rescale_factor)
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- training examples


def training_grounding(scene: Scene, rng: np.random.Generator, full_share: float) -> list[tuple[SceneObject, Box]]:
    """A true, often partial grounding of a scene, as a detector gives for a prior caption:
    the boxed objects with their boxes, in random order.

    Not in the caption's order: the decoder must find an object's entry by what the caption says of
    it (size, colour), not by counting sentences. With the entries in caption order, every shape an
    all-boxed caption got wrong was the shape of another of the scene's objects (seed 0 with the
    copy phase, 200 test scenes: 59 of 59), in three- and four-object scenes only (0.78-0.83
    correct, 1.00 with one object) — an entry looked up by position, and missed. A detector's boxes
    come in its own order, not the caption's."""
    objects = list(scene.objects)
    draw = rng.random()
    if draw < full_share:
        chosen = objects
    elif draw < full_share + 0.85 * (1 - full_share):
        chosen = [o for o in objects if rng.random() < 0.5]
    else:
        chosen = []
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    boxes: list[tuple[SceneObject, Box]] = []
    for o in chosen:
        label = o.phrase if rng.random() < 0.7 else o.kind
        xyxy = np.array(o.box)
        if rng.random() < 0.5:
            xyxy = np.clip(xyxy + rng.uniform(-0.02, 0.02, size=4), 0.0, 1.0)
            xyxy = np.array([min(xyxy[0], xyxy[2]), min(xyxy[1], xyxy[3]), max(xyxy[0], xyxy[2]), max(xyxy[1], xyxy[3])])
        x1, y1, x2, y2 = (float(c) for c in xyxy)
        boxes.append((o, Box(label=label, xyxy=(x1, y1, x2, y2), score=1.0)))
    return boxes


@dataclass(frozen=True)
class Example:
    scene: int
    """Index of the scene in the sampler's (and the cached pixels') train scenes."""
    image: int | torch.Tensor
    """Index into the cached train pixels, or the pixels [3, H, W] of an edited scene."""
    prompt: list[int]
    answer: list[int]
    weight: float = 1.0
    """Loss weight of each of the answer's tokens."""
    asked_kind: int | None = None
    """A POPE question's kind (:func:`kind_class`), for the answer-position heads."""


class ExampleSampler:
    """Draws training examples from the task mix."""

    def __init__(self, scenes: list[Scene], encoder: PromptEncoder, config: WorldModelConfig):
        self.scenes = scenes
        self.encoder = encoder
        self.rng = np.random.default_rng(config.seed + 1)
        self.tasks = [t for t, _ in config.task_weights]
        weights = np.array([w for _, w in config.task_weights], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.pope = {s: pope_questions(scenes, s, seed=config.seed) for s in POPE_STRATEGIES}
        self.counts = count_questions(scenes, seed=config.seed)
        self.index = {s.scene_id: i for i, s in enumerate(scenes)}
        self.config = config
        self.token_weights = dict(config.token_weights)
        self.simple_scenes = [i for i, s in enumerate(scenes) if len(s.objects) <= config.simple_scene_objects]
        self.step = 0
        """Stage 2's current step of the task mix (set by :func:`instruction_tune`): the first steps draw
        simple scenes."""
        self.copying = False
        """In stage 2's copy phase (set by :func:`instruction_tune`): grounded examples only, shapes hidden."""

    def scene_index(self) -> int:
        """A scene for a caption or region question: a simple one early in stage 2 (see the config)."""
        if self.step < self.config.simple_scene_steps and self.simple_scenes:
            return self.simple_scenes[int(self.rng.integers(len(self.simple_scenes)))]
        return int(self.rng.integers(len(self.scenes)))

    def sample(self, weighted: bool = True) -> Example:
        """One example; ``weighted``: its tokens carry the task's ``token_weights`` (else 1)."""
        if self.copying:
            return self._grounded(int(self.rng.integers(len(self.scenes))), shape_free=True)
        task = self.tasks[int(self.rng.choice(len(self.tasks), p=self.weights))]
        return dataclasses.replace(self.sample_task(task), weight=self.token_weights.get(task, 1.0) if weighted else 1.0)

    def base_caption_objects(self, scene: Scene) -> list[SceneObject]:
        objects = list(scene.objects)
        if len(objects) < self.config.busy_scene_objects:
            return objects
        kept = [o for o in objects if o.size != "small" or self.rng.random() >= self.config.omit_small_in_busy]
        return kept or objects[:1]  # a caption never denies what is there

    def _probe_prompt(self, question: str) -> list[int]:
        image_first = self.rng.random() >= self.config.probe_question_first
        return self.encoder.prompt_ids(question_messages(question, image_first=image_first))

    def _grounded(self, i: int, shape_free: bool = False) -> Example:
        """A grounded example; ``shape_free``: every boxed object drawn without its shape (else an
        ``obscured_boxed_ratio`` share of examples blur theirs)."""
        scene = self.scenes[i]
        grounding = training_grounding(scene, self.rng, self.config.full_context_share)
        image: int | torch.Tensor = i
        if grounding and (shape_free or self.rng.random() < self.config.obscured_boxed_ratio):
            image = pixel_tensor(obscure_shapes(scene, [o for o, _ in grounding], shape_free=shape_free)[None],
                                 self.encoder.processor)[0]
        messages = build_messages("grounded", render_context([b for _, b in grounding]))
        if self.rng.random() < self.config.bare_grounded_share:
            messages = messages[1:]  # the user turn alone: image, context, base prompt
        return Example(i, image, self.encoder.prompt_ids(messages),
                       self.encoder.answer_ids(canonical_caption(scene.objects)))

    def sample_task(self, task: str) -> Example:
        """One example of ``task`` (one of :data:`TASKS`), its tokens weighing 1."""
        if task in ("base", "grounded", "reg"):
            i = self.scene_index()
            scene = self.scenes[i]
            if task == "base":
                bare = self.rng.random() < self.config.bare_caption_share
                messages = question_messages(PAPER_PROMPTS.base) if bare else build_messages("base")
                return Example(i, i, self.encoder.prompt_ids(messages),
                               self.encoder.answer_ids(canonical_caption(self.base_caption_objects(scene))))
            if task == "grounded":
                return self._grounded(i)
            obj = scene.objects[int(self.rng.integers(len(scene.objects)))]
            return Example(i, i, self._probe_prompt(region_question(obj.box)),
                           self.encoder.answer_ids(region_expression(obj)))
        if task == "pope":
            strategy = POPE_STRATEGIES[int(self.rng.integers(len(POPE_STRATEGIES)))]
            q = self.pope[strategy][int(self.rng.integers(len(self.pope[strategy])))]
            i = self.index[q.scene_id]
            return Example(i, i, self._probe_prompt(q.question), self.encoder.answer_ids(q.answer.capitalize()),
                           asked_kind=kind_class(q.kind))
        c = self.counts[int(self.rng.integers(len(self.counts)))]
        i = self.index[c.scene_id]
        return Example(i, i, self._probe_prompt(c.question),
                       self.encoder.answer_ids(c.answer))


def prefix_length(prompt: list[int], image_token_id: int) -> int:
    """Tokens before the image: the part of a prompt (BOS, system text, "USER:") no image changes."""
    return prompt.index(image_token_id)


SHARED_PREFIX_MIN_TOKENS = 32
"""Text before the image at least this long (a system prompt) is run once for all the examples it
opens. A shorter one is not worth a forward pass of its own — a question asked before the image
belongs to one example only — so those examples run together behind their shared first token (BOS):
with a group per question, stage 3's 16 POPE questions took ~9 forward and backward passes a step."""


def shared_prefix(prompt: list[int], image_token_id: int) -> tuple[int, ...]:
    """The part of ``prompt`` that :func:`answer_loss` runs once for every example that shares it."""
    n = prefix_length(prompt, image_token_id)
    return tuple(prompt[: n if n >= SHARED_PREFIX_MIN_TOKENS else 1])


class AnswerLoss(NamedTuple):
    total: torch.Tensor
    """Weighted sum of the answer tokens' cross-entropy."""
    weight_sum: float
    states: torch.Tensor | None
    """[len(examples), hidden] the decoder's state after layer ``state_layer`` at each example's last
    prompt token (the position that predicts its first answer token), in the examples' order."""


PASS_OVERHEAD_TOKENS = 256
"""What one more forward and backward pass costs, in padded tokens (bench/bench_world_build.py): the
fixed cost :func:`length_chunks` weighs against the padding a split saves."""


def length_chunks(lengths: list[int], overhead: int) -> list[list[int]]:
    """Indices of ``lengths`` split into passes of similar length, minimising padded tokens
    (rows x longest) plus ``overhead`` per pass. Right-padding a batch to its longest row nearly
    doubled stage 2's tokens: a bare turn holds 20-token probes beside 150-token grounded captions."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    # best[j]: the cheapest split of the j shortest; cut[j]: where its last pass starts
    best = [0] * (len(order) + 1)
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        best[j], cut[j] = min((best[i] + (j - i) * lengths[order[j - 1]] + overhead, i) for i in range(j))
    chunks: list[list[int]] = []
    j = len(order)
    while j:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def answer_loss(
    model: LlavaForConditionalGeneration,
    examples: list[Example],
    pixels: torch.Tensor,
    pad_id: int,
    image_token_id: int,
    state_layer: int | None = None,
    pass_overhead_tokens: int = PASS_OVERHEAD_TOKENS,
) -> AnswerLoss:
    """Weighted sum of the cross-entropy of the answer tokens of ``examples`` and the sum of the weights
    (each token carries its example's ``weight``); with ``state_layer``, also the states at the answer
    positions (``hidden_states[state_layer]``: 0 is the embeddings).

    Exactly the loss of a plain right-padded forward pass, computed faster: examples that share
    the text before the image (same system prompt; see :func:`shared_prefix`) are run together, and
    that shared prefix — up to 160 tokens of Appendix F system prompt — is run once per pass, its
    key/value cache repeated over the pass's rows (gradients flow through it), instead of once per
    example; a group's rows go in passes of similar length (:func:`length_chunks`).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for n, ex in enumerate(examples):
        groups.setdefault(shared_prefix(ex.prompt, image_token_id), []).append(n)
    total = torch.zeros(())
    weight_sum = 0.0
    states: list[torch.Tensor | None] = [None] * len(examples)
    passes = [
        (prefix, [members[i] for i in chunk])
        for prefix, members in groups.items()
        for chunk in length_chunks([len(examples[n].prompt) + len(examples[n].answer) - len(prefix) for n in members],
                                   len(prefix) + pass_overhead_tokens)
    ]
    for prefix, members in passes:
        group = [examples[n] for n in members]
        rows, p = len(group), len(prefix)
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        cache.batch_repeat_interleave(rows)
        rests = [ex.prompt[p:] + ex.answer for ex in group]
        width = max(len(r) for r in rests)
        input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
        weights = torch.zeros((rows, width))
        attention = torch.zeros((rows, p + width), dtype=torch.long)
        attention[:, :p] = 1
        for r, (ex, rest) in enumerate(zip(group, rests, strict=True)):
            input_ids[r, : len(rest)] = torch.tensor(rest)
            labels[r, len(ex.prompt) - p : len(rest)] = torch.tensor(ex.answer)
            weights[r, len(ex.prompt) - p : len(rest)] = ex.weight
            attention[r, p : p + len(rest)] = 1
        out = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=torch.arange(p, p + width).expand(rows, width),
            pixel_values=torch.stack([pixels[ex.image] if isinstance(ex.image, int) else ex.image for ex in group]),
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=state_layer is not None,
        )
        # logits[:, t] predicts token t + 1 of the rest
        token_losses = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        total = total + (token_losses * weights[:, 1:].flatten()).sum()
        weight_sum += float(weights[:, 1:].sum())
        if state_layer is not None:
            last = torch.tensor([len(ex.prompt) - p - 1 for ex in group])
            for n, state in zip(members, out.hidden_states[state_layer][torch.arange(rows), last], strict=True):
                states[n] = state
    stacked = torch.stack([s for s in states if s is not None]).float() if state_layer is not None else None
    return AnswerLoss(total, weight_sum, stacked)


# ---------------------------------------------------------------- the two stages


def cell_targets(scenes: list[Scene]) -> torch.Tensor:
    """[N, 9, 5] per cell: occupied, shape, colour, size indices (-100 where the cell is empty), and
    the cell's own index: like CLIP's, the features say where they are, so a decoder can read an
    object's place from the feature itself, not only from where the image sits in the prompt."""
    t = torch.full((len(scenes), GRID * GRID, 5), IGNORE_INDEX, dtype=torch.long)
    t[:, :, 0] = 0
    t[:, :, 4] = torch.arange(GRID * GRID)
    colours = list(COLOURS)
    for n, s in enumerate(scenes):
        for o in s.objects:
            c = o.cell[0] * GRID + o.cell[1]
            t[n, c, :4] = torch.tensor([1, SHAPES.index(o.shape), colours.index(o.colour), SIZES.index(o.size)])
    return t


PRESENCE_LOSS_WEIGHT = 5.0
VISION_HELD_OUT_SCENES = 300


def kind_index(shape: Any, colour: Any) -> Any:
    """The class of (shape, colour) indices among the shapes x colours kinds: ints or tensors."""
    return shape * len(COLOURS) + colour


def kinds_present(targets: torch.Tensor) -> torch.Tensor:
    """[N, shapes x colours] multi-hot of the kinds in each scene, from :func:`cell_targets`."""
    occupied = targets[..., 0] == 1
    kind = kind_index(targets[..., 1], targets[..., 2]).clamp(min=0)
    present = torch.zeros(targets.shape[0], len(SHAPES) * len(COLOURS))
    return present.scatter_add_(1, kind, occupied.float()).clamp(max=1.0)


def kind_class(kind: str) -> int:
    """A "colour shape" kind's class in :func:`kinds_present`'s order."""
    colour, shape = kind.split(" ")
    return int(kind_index(SHAPES.index(shape), list(COLOURS).index(colour)))


class AnswerProbes(torch.nn.Module):
    """Stage 3's auxiliary heads on the answer position's state (``WorldModelConfig.probe_steps``)."""

    def __init__(self, hidden: int):
        super().__init__()
        kinds = len(SHAPES) * len(COLOURS)
        self.scene_kinds = torch.nn.Linear(hidden, kinds)
        self.asked_kind = torch.nn.Linear(hidden, kinds)

    def loss(self, states: torch.Tensor, examples: list[Example], presence: torch.Tensor) -> torch.Tensor:
        """The scene-kinds loss of every example (weighted as stage 1 weighs CLS's) plus the asked-kind
        loss of the POPE examples; ``presence`` [scenes, kinds] as :func:`kinds_present` gives it."""
        scenes = torch.tensor([ex.scene for ex in examples])
        loss = PRESENCE_LOSS_WEIGHT * torch.nn.functional.binary_cross_entropy_with_logits(
            self.scene_kinds(states), presence[scenes])
        asked = [n for n, ex in enumerate(examples) if ex.asked_kind is not None]
        if asked:
            loss = loss + torch.nn.functional.cross_entropy(
                self.asked_kind(states[asked]), torch.tensor([examples[n].asked_kind for n in asked]))
        return loss


@dataclass(frozen=True)
class VisionReport:
    loss: float
    """Stage 1's loss on its last batch."""
    readout: dict[str, float]
    """Held-out accuracy of stage 1's own heads: ``occupied``, ``shape``, ``colour``, ``size`` (on
    occupied cells), ``cell``, and with ``presence_token`` ``presence`` (per kind, from CLS)."""


CELL_HEADS = ("occupied", "shape", "colour", "size", "cell")


def vision_readout(
    tower: torch.nn.Module, heads: torch.nn.ModuleList, presence_head: torch.nn.Linear | None, layer: int,
    pixels: torch.Tensor, targets: torch.Tensor, batch: int = 128,
) -> dict[str, float]:
    """Accuracy of each stage-1 head on ``pixels`` (scenes it never trained on)."""
    correct = {name: 0 for name in CELL_HEADS} | ({"presence": 0} if presence_head is not None else {})
    total = dict.fromkeys(correct, 0)
    presence = kinds_present(targets)
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            states = tower(pixels[i : i + batch], output_hidden_states=True).hidden_states[layer]
            t = targets[i : i + batch]
            for k, (name, head) in enumerate(zip(CELL_HEADS, heads, strict=True)):
                known = t[..., k] != IGNORE_INDEX
                correct[name] += int((head(states[:, 1:]).argmax(-1)[known] == t[..., k][known]).sum())
                total[name] += int(known.sum())
            if presence_head is not None:
                said = presence_head(states[:, 0]) > 0
                correct["presence"] += int((said == (presence[i : i + batch] > 0)).sum())
                total["presence"] += said.numel()
    return {name: correct[name] / max(1, total[name]) for name in correct}


def pretrain_vision(
    model: LlavaForConditionalGeneration, pixels: torch.Tensor, targets: torch.Tensor, config: WorldModelConfig,
    held_out: tuple[torch.Tensor, torch.Tensor], progress: bool = True,
) -> VisionReport:
    """Stage 1. Heads read the features the projector will see (layer -2): the cells' heads their
    attributes, with ``presence_token`` a head on CLS the kinds present. ``held_out`` (pixels,
    targets) of scenes outside ``pixels`` measure what the tower learned."""
    tower = model.model.vision_tower
    hidden = tower.config.hidden_size
    classes = (2, len(SHAPES), len(COLOURS), len(SIZES), GRID * GRID)
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, n) for n in classes])
    presence_head = torch.nn.Linear(hidden, len(SHAPES) * len(COLOURS)) if config.presence_token else None
    presence = kinds_present(targets)
    params = list(tower.parameters()) + list(heads.parameters())
    params += list(presence_head.parameters()) if presence_head is not None else []
    opt = torch.optim.AdamW(params, lr=config.vision_lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    layer = model.config.vision_feature_layer
    assert isinstance(layer, int), "ShapesWorld's tower feeds one layer (-2) to the projector"
    loss_value = float("nan")
    tower.train()
    bar = tqdm(range(config.vision_steps), desc="vision pre-training", disable=not progress)
    for step in bar:
        progress_share = (step - config.vision_warmup_steps) / max(1, config.vision_steps - config.vision_warmup_steps)
        for group in opt.param_groups:
            group["lr"] = config.vision_lr * lr_factor(progress_share, step, config.vision_warmup_steps)
        idx = torch.randint(len(pixels), (config.vision_batch_size,), generator=gen)
        states = tower(pixels[idx], output_hidden_states=True).hidden_states[layer]
        feats = states[:, 1:]
        losses = [
            torch.nn.functional.cross_entropy(head(feats).flatten(0, 1), targets[idx][..., k].flatten(),
                                              ignore_index=IGNORE_INDEX)
            for k, head in enumerate(heads)
        ]
        if presence_head is not None:
            # Weighted like the five cell heads together: 24 mostly-zero targets give a small BCE.
            losses.append(PRESENCE_LOSS_WEIGHT * torch.nn.functional.binary_cross_entropy_with_logits(
                presence_head(states[:, 0]), presence[idx]))
        loss = torch.stack(losses).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_value = float(loss.detach())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
    tower.eval()
    readout = vision_readout(tower, heads, presence_head, layer, *held_out)
    return VisionReport(loss_value, readout)


@contextlib.contextmanager
def vision_in_float32(model: LlavaForConditionalGeneration) -> Iterator[None]:
    """Keep the vision tower and projector out of an enclosing bfloat16 autocast: bfloat16's 8-bit
    mantissa rounds away the small feature differences that tell colours and shapes apart, and the
    tower was pre-trained, and runs at inference, in float32."""
    modules = (model.model.vision_tower, model.model.multi_modal_projector)
    for module in modules:

        def forward(*args: Any, _forward: Any = module.forward, **kwargs: Any) -> Any:
            with torch.autocast("cpu", enabled=False):
                return _forward(*args, **kwargs)

        module.forward = forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward  # the class's own forward again


def native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU (else it emulates it)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_emulation_warning(config: WorldModelConfig) -> str | None:
    """Why a build that asks for bfloat16 on a CPU without it natively will be slow, or ``None``.
    bfloat16 is a valid configuration there (a build is a function of its configuration, so a bf16
    build can be reproduced on any CPU), but oneDNN emulates it: on an AVX2-only AMD EPYC, stage 2 of
    a seed-0 build forced to bf16 ran 9.9 s a step (one thread); in float32 it ran 0.8 s (two threads)."""
    if not config.bf16 or native_bf16():
        return None
    return (f"bfloat16 was asked for, but this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native "
            "bfloat16: it is emulated, many times slower than float32 (stage 2 alone can take hours). "
            "--precision float32 builds in minutes here.")


def lr_factor(progress: float, step: int, warmup_steps: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``floor`` as ``progress`` goes 0 -> 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


ATTRIBUTE_WORDS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS)}
STALL_CHECK_SCENES = 48


def attribute_losses(model: LlavaForConditionalGeneration, encoder: PromptEncoder, scenes: list[Scene]) -> dict[str, float]:
    """Mean loss, teacher-forced, of each shape and colour word in the full base-prompt captions of
    ``scenes``, among the words of its class (a decoder blind to the image scores ln 4 and ln 6)."""
    tokenizer = encoder.tokenizer
    classes = {name: sorted(int(tokenizer.convert_tokens_to_ids(w)) for w in words)
               for name, words in ATTRIBUTE_WORDS.items()}
    losses: dict[str, list[float]] = {name: [] for name in classes}
    pixels = pixel_tensor([s.render() for s in scenes], encoder.processor)
    prompt = encoder.prompt_ids(build_messages("base"))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for scene, image in zip(scenes, pixels, strict=True):
            answer = encoder.answer_ids(canonical_caption(scene.objects))
            logits = model(input_ids=torch.tensor([prompt + answer]), pixel_values=image[None]).logits[0].float()
            for j, token in enumerate(answer):
                row = logits[len(prompt) + j - 1]  # the logits that predict answer token j
                for name, ids in classes.items():
                    if token in ids:
                        losses[name].append(float(torch.logsumexp(row[ids], 0) - row[token]))
    model.train(was_training)
    return {name: float(np.mean(v)) for name, v in losses.items()}


class DecoderStalled(RuntimeError):
    """Stage 2 reached its stall check with a decoder that still does not read the image."""

    def __init__(self, losses: dict[str, float]):
        self.losses = losses
        super().__init__("decoder still blind to the image at the stall check (held-out loss / chance: "
                         + ", ".join(f"{k} {v / math.log(len(ATTRIBUTE_WORDS[k])):.2f}" for k, v in losses.items())
                         + ")")


def stalled(losses: dict[str, float], ratio: float) -> bool:
    return any(v >= ratio * math.log(len(ATTRIBUTE_WORDS[k])) for k, v in losses.items())


@contextlib.contextmanager
def tuning_decoder(model: LlavaForConditionalGeneration) -> Iterator[None]:
    """Stages 2 and 3: projector and decoder train, the vision tower stays frozen and in float32;
    afterwards the model is in eval mode with every parameter trainable again."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    model.train()
    model.model.vision_tower.eval()
    try:
        with vision_in_float32(model):  # once for the whole loop, not per step
            yield
    finally:
        model.eval()
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(True)


def optimiser_step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def instruction_tune(
    model: LlavaForConditionalGeneration, pixels: torch.Tensor, sampler: ExampleSampler, pad_id: int,
    config: WorldModelConfig, progress: bool = True,
) -> float:
    """Stage 2 (vision tower frozen): ``config.steps`` steps of the task mix with ``config.copy_steps`` of
    the copy phase from its step ``config.copy_from``, under one learning-rate schedule; returns the
    mean loss of the last 20 steps.

    Raises :class:`DecoderStalled` at the mix's step ``config.stall_check_step`` when the decoder does
    not yet read shapes and colours on held-out scenes."""
    recent: list[float] = []
    image_token_id = int(model.config.image_token_id)
    bf16 = config.bf16
    total = config.copy_steps + config.steps
    # the stall check at the mix's step stall_check_step, before a copy phase that starts there
    stall_at = config.stall_check_step + (config.copy_steps if config.stall_check_step > config.copy_from else 0)
    bar = tqdm(range(total), desc="instruction tuning", disable=not progress)
    with tuning_decoder(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
        for overall in bar:
            copy_end = config.copy_from + config.copy_steps
            copying = config.copy_from <= overall < copy_end
            # the mix's step: paused at copy_from during the copy phase
            step = overall if overall < config.copy_from else max(config.copy_from, overall - config.copy_steps)
            if config.stall_check_step and overall == stall_at:
                # Train-split scenes past the ones trained on and past stage 1's held-out ones.
                held_out = generate_scenes("train", STALL_CHECK_SCENES,
                                           start=config.train_scenes + VISION_HELD_OUT_SCENES)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    losses = attribute_losses(model, sampler.encoder, held_out)
                log.info("stall check at step %d: held-out %s", step,
                         ", ".join(f"{k} loss {v:.3f}" for k, v in losses.items()))
                if stalled(losses, config.stall_loss_ratio):
                    raise DecoderStalled(losses)
            sampler.step, sampler.copying = step, copying
            done = (overall - config.warmup_steps) / max(1, total - config.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = config.lr * lr_factor(done, overall, config.warmup_steps, config.lr_floor)
            weighted = done >= config.token_weights_from
            examples = [sampler.sample(weighted) for _ in range(config.batch_size)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                answers = answer_loss(model, examples, pixels, pad_id, image_token_id)
            loss = answers.total / max(1.0, answers.weight_sum)
            optimiser_step(opt, params, loss)
            recent = (recent + [float(loss.detach())])[-20:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    return sum(recent) / max(1, len(recent))


def probe_tune(
    model: LlavaForConditionalGeneration, pixels: torch.Tensor, sampler: ExampleSampler, pad_id: int,
    config: WorldModelConfig, progress: bool = True,
) -> float:
    """Stage 3 (vision tower frozen), ``config.probe_steps`` steps of captions and POPE questions with
    the answer-position probes (see ``WorldModelConfig.probe_steps``); returns the mean POPE answer
    loss of the last 20 steps."""
    probes = AnswerProbes(int(model.config.get_text_config().hidden_size))
    presence = kinds_present(cell_targets(sampler.scenes))
    image_token_id = int(model.config.image_token_id)
    bf16 = config.bf16
    recent: list[float] = []
    bar = tqdm(range(config.probe_steps), desc="POPE with answer probes", disable=not progress)
    with tuning_decoder(model):
        params = [p for p in model.parameters() if p.requires_grad] + list(probes.parameters())
        opt = torch.optim.AdamW(params, lr=config.probe_lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
        for step in bar:
            for group in opt.param_groups:
                done = (step - config.probe_warmup_steps) / max(1, config.probe_steps - config.probe_warmup_steps)
                group["lr"] = config.probe_lr * lr_factor(done, step, config.probe_warmup_steps, config.probe_lr_floor)
            captions = [sampler.sample_task("base" if sampler.rng.random() < config.probe_base_share else "grounded")
                        for _ in range(config.probe_captions)]
            captions += [dataclasses.replace(sampler.sample_task("count"), weight=sampler.token_weights.get("count", 1.0))
                         for _ in range(config.probe_counts)]
            questions = [sampler.sample_task("pope") for _ in range(config.probe_questions)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                described = answer_loss(model, captions, pixels, pad_id, image_token_id)
                answered = answer_loss(model, questions, pixels, pad_id, image_token_id, config.answer_probe_layer)
            assert answered.states is not None
            pope = answered.total / max(1.0, answered.weight_sum)
            loss = (described.total / max(1.0, described.weight_sum) + config.probe_question_weight * pope
                    + config.answer_probe_weight * probes.loss(answered.states, questions, presence))
            optimiser_step(opt, params, loss)
            recent = (recent + [float(pope.detach())])[-20:]
            bar.set_postfix(pope_loss=f"{sum(recent) / len(recent):.3f}")
    return sum(recent) / max(1, len(recent))


DECODER_RESTART_SEED_STEP = 1000
"""Restart r of seed s initialises projector and decoder with seed s + 1000 r: not another build's seed."""


def reinitialise_decoder(model: LlavaForConditionalGeneration, seed: int) -> LlavaForConditionalGeneration:
    """A fresh initialisation of ``model``'s architecture from ``seed``, with ``model``'s vision tower."""
    torch.manual_seed(seed)
    fresh = LlavaForConditionalGeneration(model.config)
    fresh.model.vision_tower.load_state_dict(model.model.vision_tower.state_dict())
    return fresh.eval()


class VisionGateError(RuntimeError):
    """Stage 1 ended below the read-out the configuration asks for: a collapsed vision tower."""


@dataclass
class TrainReport:
    parameters: int
    vision_loss: float
    vision_readout: dict[str, float]
    loss: float
    steps: int
    """Stage-2 steps run, those of restarted starts included."""
    decoder_restarts: list[dict[str, float]]
    """Held-out attribute losses of each stage-2 start that failed its stall check."""
    pope_loss: float | None
    """Stage 3's POPE answer loss over its last 20 steps (``None`` without stage 3)."""
    vision_seconds: float
    tuning_seconds: float
    probe_seconds: float
    """Stage 3's seconds, those of redrawn stage 3s (:func:`redraw_stage_three`) included."""
    environment: dict[str, Any]
    config: dict[str, Any]
    stage_three_draw: int = 0
    """Which stage 3 made the saved model: 0 the build's own, d > 0 :func:`redraw_stage_three`'s d-th."""

    @property
    def training_seconds(self) -> float:
        return self.vision_seconds + self.tuning_seconds + self.probe_seconds

    def write(self, out_dir: Path) -> None:
        """``train_report.json`` beside the model."""
        (out_dir / "train_report.json").write_text(json.dumps({**dataclasses.asdict(self),
                                                               "training_seconds": self.training_seconds}, indent=1))


def build_environment(config: WorldModelConfig) -> dict[str, Any]:
    """What a build ran on: its precision and threads, library versions, and the CPU's flags that
    select torch's kernels — so two builds that differ can be told apart."""
    import platform

    import PIL
    import tokenizers
    import transformers

    cpuinfo = _cpuinfo_lines()
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    model_name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                      platform.processor())
    return {
        "precision": "bfloat16 autocast (decoder)" if config.bf16 else "float32",
        "threads": config.threads,
        "cpu": model_name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"}),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "numpy": np.__version__, "pillow": PIL.__version__},
    }


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block, and restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_for_training(
    model_dir: Path, config: WorldModelConfig, progress: bool,
) -> tuple[LlavaForConditionalGeneration, Any, list[Scene], torch.Tensor]:
    """The model and processor saved in ``model_dir`` (float32 weights), with the ``config.train_scenes``
    training scenes and their pixel values: what every training stage starts from."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    scenes = generate_scenes("train", config.train_scenes)
    pixels = pixel_tensor([s.render() for s in tqdm(scenes, desc="rendering train scenes", disable=not progress)],
                          processor)
    return model, processor, scenes, pixels


def train_world_vlm(
    out_dir: str | Path, config: WorldModelConfig, min_readout: dict[str, float] | None = None, progress: bool = True,
    stage_two_dir: str | Path | None = None,
) -> TrainReport:
    """Build, train and ``save_pretrained`` the base VLM into ``out_dir`` (writes ``train_report.json``);
    with ``stage_two_dir``, the model as stage 2 left it is saved there too, for :func:`redraw_stage_three`.

    Raises :class:`VisionGateError` right after stage 1 when a held-out read-out is below
    ``min_readout`` (e.g. ``{"shape": 0.85}``): a build on a collapsed tower is not worth stage 2.
    """
    out = Path(out_dir)
    slow = bf16_emulation_warning(config)
    if slow:
        log.warning(slow)
    torch.manual_seed(config.seed)
    with torch_threads(config.threads):
        build_tiny_vlm(out, arch="llava", chat_format=CHAT_FORMAT, seed=config.seed, tokenizer=world_tokenizer(),
                       vision_feature_select_strategy="full" if config.presence_token else "default",
                       **config.sizes)
        model, processor, scenes, pixels = load_for_training(out, config, progress)
        # Train-split scenes past the ones trained on: unseen, and apart from the test split.
        held_out = generate_scenes("train", VISION_HELD_OUT_SCENES, start=config.train_scenes)
        t0 = time.perf_counter()
        vision = pretrain_vision(model, pixels, cell_targets(scenes), config,
                                 (pixel_tensor([s.render() for s in held_out], processor), cell_targets(held_out)),
                                 progress)
        t1 = time.perf_counter()
        log.info("stage 1: loss %.3f, held-out read-out %s", vision.loss,
                 ", ".join(f"{k} {v:.3f}" for k, v in vision.readout.items()))
        short = {k: (vision.readout[k], v) for k, v in (min_readout or {}).items() if vision.readout[k] < v}
        if short:
            raise VisionGateError("vision pre-training ended below the gate (held-out read-out, minimum): "
                                  + ", ".join(f"{k} {got:.3f} < {need}" for k, (got, need) in short.items()))
        stalls: list[dict[str, float]] = []
        while True:
            sampler = ExampleSampler(scenes, PromptEncoder(processor), config)
            try:
                loss = instruction_tune(model, pixels, sampler, int(processor.tokenizer.pad_token_id), config,
                                        progress)
                break
            except DecoderStalled as exc:
                stalls.append(exc.losses)
                if len(stalls) > config.max_decoder_restarts:
                    raise
                log.warning("%s: projector and decoder start again (restart %d of %d)", exc, len(stalls),
                            config.max_decoder_restarts)
                model = reinitialise_decoder(model, config.seed + DECODER_RESTART_SEED_STEP * len(stalls))
        t2 = time.perf_counter()
        if stage_two_dir is not None:
            model.save_pretrained(stage_two_dir)
            processor.save_pretrained(stage_two_dir)
        pope_loss = (probe_tune(model, pixels, sampler, int(processor.tokenizer.pad_token_id), config, progress)
                     if config.probe_steps else None)
        t3 = time.perf_counter()
    model.save_pretrained(out)
    report = TrainReport(
        parameters=sum(p.numel() for p in model.parameters()),
        vision_loss=vision.loss,
        vision_readout=vision.readout,
        loss=loss,
        steps=config.copy_steps + config.steps + config.stall_check_step * len(stalls),
        decoder_restarts=stalls,
        pope_loss=pope_loss,
        vision_seconds=t1 - t0,
        tuning_seconds=t2 - t1,
        probe_seconds=t3 - t2,
        environment=build_environment(config),
        config=config.to_json(),
    )
    report.write(out)
    log.info("trained ShapesWorld VLM (%d parameters) in %.0f s, final loss %.3f", report.parameters,
             report.training_seconds, loss)
    return report


STAGE_THREE_REDRAW_SEED_STEP = 10_000
"""Redraw d of stage 3 of seed s draws its examples and initialises its answer probes with s + 10000 d."""


def redraw_stage_three(
    stage_two_dir: str | Path, out_dir: str | Path, report: TrainReport, config: WorldModelConfig, draw: int,
    progress: bool = True,
) -> TrainReport:
    """Stage 3 again, on the stage-2 model ``train_world_vlm`` saved in ``stage_two_dir``, with the
    ``draw``-th redraw's seed (:data:`STAGE_THREE_REDRAW_SEED_STEP`); saves the model into ``out_dir``
    (replacing what is there) and returns ``report`` updated with this stage 3.

    Whether stage 3 forms POPE's conjunction is largely its own draw: on one stage-2 model (seed 4,
    2-core AMD EPYC, float32, the gate's 100 held-out scenes), stage 3 with seed 4 ended at POPE
    0.588 (lowest split, AUC 0.666) and with seed 5 at 0.736 (AUC 0.818), captions alike (all-boxed
    0.936 and 0.941). A redraw costs stage 3's minutes, not a whole build's."""
    seed = config.seed + STAGE_THREE_REDRAW_SEED_STEP * draw
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(stage_two_dir, out)  # processor, tokenizer and chat template with the weights
    torch.manual_seed(seed)
    with torch_threads(config.threads):
        model, processor, scenes, pixels = load_for_training(out, config, progress)
        sampler = ExampleSampler(scenes, PromptEncoder(processor), dataclasses.replace(config, seed=seed))
        sampler.step = config.steps  # past stage 2's simple-scene steps, where stage 3 always starts
        t = time.perf_counter()
        pope_loss = probe_tune(model, pixels, sampler, int(processor.tokenizer.pad_token_id), config, progress)
        seconds = time.perf_counter() - t
    model.save_pretrained(out)
    redrawn = dataclasses.replace(report, pope_loss=pope_loss, probe_seconds=report.probe_seconds + seconds,
                                  stage_three_draw=draw)
    redrawn.write(out)
    log.info("stage 3, redraw %d (seed %d): %.0f s, POPE loss %.3f", draw, seed, seconds, pope_loss)
    return redrawn
