"""Training data: LLaVA conversation JSONL, read strictly, and the CVQ mix.

One sample a line::

    {"id": "img-7-s3", "image": "scenes/7.png",
     "conversations": [{"from": "human", "value": "<image>\\n<base prompt>"},
                       {"from": "gpt", "value": "In the image, ..."}]}

SVP's selected samples have one turn whose question is the base prompt (the grounding is never
shown in training). VQ pairs for the CVQ variant use the same format and may have several turns
(LLaVA's own instruction data does); every ``gpt`` turn is supervised. A malformed line is an
error that names the file and the line: a round's data is never silently thinned.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<image>"


class DatasetError(ValueError):
    """A malformed training file; ``line`` is 1-based (0 when the file as a whole is wrong)."""

    def __init__(self, path: Path, line: int, message: str):
        where = f"{path.name} line {line}" if line else path.name
        super().__init__(f"{where}: {message}")
        self.path, self.line = path, line


@dataclass(frozen=True)
class Turn:
    question: str
    """The human text with the ``<image>`` placeholder removed."""
    answer: str


@dataclass(frozen=True)
class ConversationSample:
    id: str
    image: str
    """As written in the file (relative to the data root) until a caller resolves it."""
    turns: tuple[Turn, ...]
    source: str = "selected"
    """``selected`` for SVP's samples, ``vq`` for mixed-in CVQ pairs."""
    line: int = 0
    """1-based line of the sample in its file, for error messages."""


def _question(value: str, first: bool) -> str:
    count = value.count(IMAGE_PLACEHOLDER)
    if first and count != 1:
        raise ValueError(f"the first human turn must hold exactly one {IMAGE_PLACEHOLDER!r}, found {count}")
    if not first and count:
        raise ValueError(f"only the first human turn may hold {IMAGE_PLACEHOLDER!r}")
    # LLaVA writes the placeholder as a prefix ("<image>\n...") or a suffix ("...\n<image>").
    question = value.replace(IMAGE_PLACEHOLDER, "").strip()
    if not question:
        raise ValueError("a human turn has no text besides the image")
    return question


def parse_sample(record: Any, source: str = "selected", line: int = 0) -> ConversationSample:
    """One JSON record as a sample; ``ValueError`` says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("id", "image", "conversations") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    sample_id, image, conversations = record["id"], record["image"], record["conversations"]
    if not isinstance(sample_id, str | int) or isinstance(sample_id, bool) or str(sample_id) == "":
        raise ValueError("'id' must be a non-empty string or an integer")
    if not isinstance(image, str) or not image:
        raise ValueError("'image' must be a non-empty path string")
    if not isinstance(conversations, list) or len(conversations) < 2 or len(conversations) % 2:
        raise ValueError("'conversations' must be a list of human/gpt pairs")
    turns = []
    for i in range(0, len(conversations), 2):
        pair = conversations[i : i + 2]
        for j, (message, role) in enumerate(zip(pair, ("human", "gpt"), strict=True)):
            if not isinstance(message, dict) or message.get("from") != role or not isinstance(message.get("value"), str):
                raise ValueError(f"conversations[{i + j}] must be {{'from': '{role}', 'value': <string>}}")
        question = _question(pair[0]["value"], first=i == 0)
        answer = pair[1]["value"].strip()
        if not answer:
            raise ValueError(f"conversations[{i + 1}] (gpt) is empty")
        if IMAGE_PLACEHOLDER in answer:
            raise ValueError(f"conversations[{i + 1}] (gpt) holds {IMAGE_PLACEHOLDER!r}")
        turns.append(Turn(question, answer))
    return ConversationSample(str(sample_id), image, tuple(turns), source, line)


def read_conversations(path: Path, source: str = "selected") -> list[ConversationSample]:
    """Every sample of a JSONL file (blank lines skipped); :class:`DatasetError` names the bad line."""
    samples = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    samples.append(parse_sample(json.loads(line), source, number))
                except json.JSONDecodeError as exc:
                    raise DatasetError(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
                except ValueError as exc:
                    raise DatasetError(path, number, str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(path, 0, f"not UTF-8 text ({exc.reason})") from exc
    if not samples:
        raise DatasetError(path, 0, "holds no samples")
    return samples


def cvq_count(n_samples: int, ratio: float) -> int:
    """How many VQ pairs the CVQ variant mixes into ``n_samples`` selected samples."""
    return round(n_samples * ratio)


def mix_cvq(
    samples: Sequence[ConversationSample], vq_pairs: Sequence[ConversationSample], ratio: float, seed: int
) -> list[ConversationSample]:
    """The selected samples followed by ``round(ratio * len(samples))`` VQ pairs drawn without
    replacement (ratio 1.0 is the paper's "equal number"). The draw depends only on ``seed`` and the
    inputs; the training loop shuffles the mix. ``ValueError`` when there are too few VQ pairs."""
    wanted = cvq_count(len(samples), ratio)
    if wanted > len(vq_pairs):
        raise ValueError(
            f"CVQ ratio {ratio} needs {wanted} VQ pairs for {len(samples)} samples, the VQ file has {len(vq_pairs)}"
        )
    drawn = random.Random(seed).sample(list(vq_pairs), wanted)
    return list(samples) + [dataclasses.replace(s, source="vq") for s in drawn]
