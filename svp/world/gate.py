"""The quality gate a ShapesWorld base VLM passes before ``svp world build`` caches it.

A build can look fine (it ran every step, its loss fell) and still be useless: a vision tower
that stopped reading shapes gives a decoder that calls every object a "triangle". The gate
measures, on train-split scenes the model never trained on (indices past ``train_scenes``, apart
from the test split the demo reports on):

- stage 1's held-out read-out of shape and colour (from :class:`svp.world.model.VisionReport`);
- ``all_boxed``: with every object boxed in ``<context>``, the share of boxed objects the greedy
  caption gets right; ``all_boxed_shapes_hidden``: the same with every shape unreadable in the
  image, so only what the model takes from its grounding — what SVP relies on — counts (gated too);
- base-prompt object recall and hallucination rate;
- ``top_shape_share``: the share of the most frequent shape word among all mentions — a collapsed
  model names one shape for everything;
- POPE accuracy, the lowest of its three splits (gated, since stage 3 teaches yes/no presence
  questions: without it accuracy stayed at 0.50 on every seed, see
  ``svp.world.model.WorldModelConfig.probe_steps``), and the AUC of the yes/no margin, reported: it
  tells a model with no signal (0.5) from one whose signal a yes-bias hides.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from svp.evaluation.suite import EvalOptions, evaluate_world
from svp.world.language import mentioned_objects

Metrics = dict[str, float]


@dataclass(frozen=True)
class GateThresholds:
    min_readout: dict[str, float] = field(default_factory=lambda: {"shape": 0.85, "colour": 0.95})
    """Stage 1's held-out read-out, checked before stage 2 starts."""
    min_all_boxed: float = 0.85
    min_all_boxed_shapes_hidden: float | None = 0.5
    """The copy from the grounding that SVP's grounded samples rely on (chance 0.25). Full builds
    (float32, 300 test scenes) where it stayed under 0.5 also stayed under the issue's all-boxed
    band: seed 3 at 0.397 had all-boxed 0.886 (0.852 at the gate), while 0.61-0.93 came with
    0.91-0.96 (seeds 0-2 on an AVX-512 Xeon, seeds 0 and 4 on an AVX2 AMD EPYC)."""
    min_recall: float = 0.35
    max_hallucination: float = 0.35
    max_top_shape_share: float = 0.6
    min_pope_accuracy: float | None = 0.65
    """On the lowest of the three splits; ``None``: reported only (the CI model, which trains for
    seconds). The gate's most frequent failure: of nine full builds of today's recipe, seeds 1 (AMD
    EPYC, 0.600), 2 (Xeon, 0.643) and 100002 (AMD EPYC, 0.612) failed it with every other measure in
    bounds (seeds 2 and 100002 said yes to 0.80-0.82 of the adversarial questions). It is not a
    measure to patch at the gate: 200 more stage-3 steps with adversarial questions drawn twice as
    often lifted seeds 1 and 100002 past it (0.660, 0.652), yet 100002's adversarial split on 300
    test scenes stayed at 0.611 (F1 0.696), out of the issue's band. What is redrawn is stage 3 as a
    whole, from the stage-2 model (``WorldScale.stage_three_draws``), and then the next seed: seed 1's
    retry, 100001, passed at 0.695."""
    scenes: int = 100

    def bounds(self) -> dict[str, tuple[str, float | None]]:
        """metric -> (">=" or "<=", bound or None for reported only), in table order."""
        return {
            **{f"readout_{k}": (">=", v) for k, v in self.min_readout.items()},
            "all_boxed": (">=", self.min_all_boxed),
            "all_boxed_shapes_hidden": (">=", self.min_all_boxed_shapes_hidden),
            "recall": (">=", self.min_recall),
            "hallucination": ("<=", self.max_hallucination),
            "top_shape_share": ("<=", self.max_top_shape_share),
            "pope_accuracy_min": (">=", self.min_pope_accuracy),
            "pope_auc_min": (">=", None),
        }


def top_shape_share(captions: list[str]) -> float:
    """Share of the most frequent shape among every object the captions mention (0 if none)."""
    shapes: Counter[str] = Counter()
    for caption in captions:
        for kind, n in mentioned_objects(caption).items():
            shapes[kind.split()[-1]] += n
    return max(shapes.values()) / sum(shapes.values()) if shapes else 0.0


def measure_gate(model_dir: str | Path, thresholds: GateThresholds, start: int, progress: bool = True) -> Metrics:
    """The gate's generation metrics of the model saved in ``model_dir`` on train scenes
    ``start..start+n-1`` (stage 1's read-out comes from its own report)."""
    from svp.models.loading import load_vlm

    results, texts = evaluate_world(load_vlm(str(model_dir)), "train", thresholds.scenes,
                                    ("caption", "grounded", "pope"), EvalOptions(meteor=False, progress=progress),
                                    start=start)
    return {
        "all_boxed": results["grounded_all_boxed"]["boxed_object_accuracy"],
        "all_boxed_shapes_hidden": results["grounded_all_boxed"]["shapes_hidden_accuracy"],
        "recall": results["objects"]["object_recall"],
        "hallucination": results["objects"]["hallucination_rate"],
        "top_shape_share": top_shape_share(texts["caption"] + texts["grounded"]),
        "pope_accuracy_min": min(results[k]["accuracy"] for k in results if k.startswith("pope_")),
        "pope_auc_min": min(results[k]["yes_margin_auc"] for k in results if k.startswith("pope_")),
    }


def gate_failures(metrics: Metrics, thresholds: GateThresholds) -> list[str]:
    """One line per metric outside its bound (empty: the gate passes)."""
    failures = []
    for name, (op, bound) in thresholds.bounds().items():
        if name not in metrics or bound is None:
            continue
        if not (metrics[name] >= bound if op == ">=" else metrics[name] <= bound):
            failures.append(f"{name} {metrics[name]:.3f} (needs {op} {bound})")
    return failures


def gate_table(metrics: Metrics, thresholds: GateThresholds) -> str:
    """The gate as a plain-text table: metric, value, bound, pass/FAIL."""
    lines = [f"{'gate metric':<24}{'value':>8}  {'bound':<8}  ", "-" * 48]
    for name, (op, bound) in thresholds.bounds().items():
        if name not in metrics:
            continue
        if bound is None:
            lines.append(f"{name:<24}{metrics[name]:>8.3f}  {'':<8}  (reported)")
            continue
        ok = not gate_failures({name: metrics[name]}, thresholds)
        lines.append(f"{name:<24}{metrics[name]:>8.3f}  {op} {bound:<5}  {'pass' if ok else 'FAIL'}")
    return "\n".join(lines)
