"""Metric code of the evaluation suite. Pure functions of predictions and references, so the same
code scores ShapesWorld and real data given a COCO-format reference file.

- Captioning (and REG): BLEU-1..4, METEOR, ROUGE-L and CIDEr exactly as pycocoevalcap computes
  them (its PTB tokenizer first; METEOR and the tokenizer run on Java) — never re-implemented.
- Objects (CHAIR-style, Rohrbach et al. 2018): from the multiset of objects each caption asserts
  (a parser turns text into object labels) against the ground-truth multiset:
  ``object_recall`` = matched / ground-truth objects, ``hallucination_rate`` (CHAIR_i) =
  unmatched mentions / mentions, ``caption_hallucination_rate`` (CHAIR_s) = captions with at
  least one unmatched mention / captions. A mention without a colour ("a circle") matches any
  remaining ground-truth object of its shape.
- Yes/no probes (POPE): accuracy, precision, recall, F1 of "yes", and the yes ratio, with POPE's
  own answer reading (an answer that contains "no" or "not" is a no).
- Counting: exact-match accuracy after reading the first number (digits or a number word).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def caption_scores(
    predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]], meteor: bool = True
) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr of one prediction per id against its references.

    Ids of ``predictions`` must all have references; METEOR is skipped with ``meteor=False``
    (it starts a 2 GB Java process).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references or not references[k]]
    if missing:
        raise ValueError(f"no references for {len(missing)} prediction ids, e.g. {missing[:3]}")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in references[k]] for k in predictions})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in predictions})
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer  # its __del__ stops the Java process
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


MentionParser = Callable[[str], Counter[str]]


def _match(mentions: Counter[str], truth: Counter[str]) -> int:
    """How many mentions a ground-truth object accounts for (exact kind first, then bare shapes)."""
    remaining = Counter(truth)
    matched = 0
    for kind, n in sorted(mentions.items(), key=lambda kv: " " not in kv[0]):
        if " " in kind or kind in remaining:
            take = min(n, remaining[kind])
            remaining[kind] -= take
        else:  # a bare head ("circle") matches any remaining object whose label ends with it
            take = 0
            for label in sorted(remaining):
                if label.endswith(" " + kind) and remaining[label] > 0 and take < n:
                    got = min(n - take, remaining[label])
                    remaining[label] -= got
                    take += got
        matched += take
    return matched


def object_counts(caption: str, truth: Counter[str], parse: MentionParser) -> tuple[int, int, int]:
    """One caption's ground-truth objects, mentions, and mentions matched to the truth."""
    mentions = parse(caption)
    return sum(truth.values()), sum(mentions.values()), _match(mentions, truth)


def object_scores(
    captions: Mapping[Any, str], truths: Mapping[Any, Counter[str]], parse: MentionParser
) -> dict[str, float]:
    """CHAIR-style object recall and hallucination over a corpus (see module docstring)."""
    counts = [object_counts(caption, truths[key], parse) for key, caption in captions.items()]
    n_truth = sum(c[0] for c in counts)
    n_mentions = sum(c[1] for c in counts)
    n_matched = sum(c[2] for c in counts)
    n_bad_captions = sum(matched < mentions for _, mentions, matched in counts)
    return {
        "object_recall": n_matched / n_truth if n_truth else 0.0,
        "hallucination_rate": (n_mentions - n_matched) / n_mentions if n_mentions else 0.0,
        "caption_hallucination_rate": n_bad_captions / len(captions) if captions else 0.0,
        "mentions_per_caption": n_mentions / len(captions) if captions else 0.0,
    }


def read_yes_no(answer: str) -> str:
    """POPE's reading: the first sentence; "no"/"not" anywhere in it means no, anything else yes."""
    first = answer.strip().split(".")[0].lower()
    words = re.findall(r"[a-z]+", first)
    return "no" if "no" in words or "not" in words else "yes"


def yes_no_scores(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE metrics of free-text ``answers`` against ``labels`` ("yes"/"no"); positive = yes."""
    if len(answers) != len(labels) or not answers:
        raise ValueError("need one answer per label, and at least one")
    pred = [read_yes_no(a) for a in answers]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, labels, strict=True))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, labels, strict=True))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred, labels, strict=True))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(pred),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(pred),
    }


def ranking_auc(scores: Sequence[float], labels: Sequence[str]) -> float:
    """Probability that a "yes" item scores above a "no" item (ties count half): the Mann-Whitney AUC.
    0.5 is no signal whatever the threshold; POPE accuracy at 0.5 can hide either."""
    pos = [s for s, g in zip(scores, labels, strict=True) if g == "yes"]
    neg = [s for s, g in zip(scores, labels, strict=True) if g == "no"]
    if not pos or not neg:
        raise ValueError("need at least one yes and one no label")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def read_number(answer: str) -> int | None:
    """The first number in an answer, written in digits or as a word (zero..ten); None if there is none."""
    for token in re.findall(r"\d+|[a-z]+", answer.lower()):
        if token.isdigit():
            return int(token)
        if token in _NUMBER_WORDS:
            return _NUMBER_WORDS[token]
    return None


def counting_accuracy(answers: Sequence[str], labels: Sequence[str]) -> float:
    if len(answers) != len(labels) or not answers:
        raise ValueError("need one answer per label, and at least one")
    return sum(read_number(a) == read_number(g) for a, g in zip(answers, labels, strict=True)) / len(answers)


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table: one row per metric group, ``name  metric=value ...``."""
    width = max((len(k) for k in results), default=0)
    lines = []
    for group, values in results.items():
        cells = "  ".join(f"{m}={v:.3f}" if isinstance(v, float) else f"{m}={v}" for m, v in values.items())
        lines.append(f"{group.ljust(width)}  {cells}")
    return "\n".join(lines)
