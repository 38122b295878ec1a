"""Strict JSONL reading (errors name the line) and the CVQ mix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from svp.prompts import PAPER_PROMPTS
from svp.training.dataset import ConversationSample, DatasetError, Turn, cvq_count, mix_cvq, read_conversations
from tests.svp.training.fixtures import selected_record, write_jsonl

GOOD = selected_record("a", "scenes/0.png", "In the image, a red circle.")


def test_reads_selected_samples(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": 7}) + "\n")
    samples = read_conversations(path)
    assert samples == [
        ConversationSample("a", "scenes/0.png", (Turn(PAPER_PROMPTS.base, "In the image, a red circle."),), "selected", 1),
        ConversationSample("7", "scenes/0.png", (Turn(PAPER_PROMPTS.base, "In the image, a red circle."),), "selected", 3),
    ]


def test_multi_turn_and_suffix_placeholder(tmp_path: Path) -> None:
    record = {"id": "q", "image": "x.png", "conversations": [
        {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A circle."},
        {"from": "human", "value": "Which color?"}, {"from": "gpt", "value": " Red. "},
    ]}
    (sample,) = read_conversations(write_jsonl(tmp_path / "d.jsonl", [record]), source="vq")
    assert sample.turns == (Turn("What is this?", "A circle."), Turn("Which color?", "Red."))
    assert sample.source == "vq"


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"id": "a", "image": "x.png"}), "missing field(s) conversations"),
    (json.dumps({**GOOD, "image": ""}), "'image' must be"),
    (json.dumps({**GOOD, "id": True}), "'id' must be"),
    (json.dumps({**GOOD, "conversations": GOOD["conversations"][:1]}), "human/gpt pairs"),
    (json.dumps({**GOOD, "conversations": GOOD["conversations"][::-1]}), "conversations[0] must be"),
    (json.dumps({**GOOD, "conversations": [{"from": "human", "value": "no image"}, GOOD["conversations"][1]]}),
     "exactly one '<image>'"),
    (json.dumps({**GOOD, "conversations": [GOOD["conversations"][0], {"from": "gpt", "value": "  "}]}),
     "conversations[1] (gpt) is empty"),
    (json.dumps({**GOOD, "conversations": [{"from": "human", "value": "<image>"}, GOOD["conversations"][1]]}),
     "no text besides the image"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_malformed_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DatasetError) as info:
        read_conversations(path)
    assert info.value.line == 3
    assert str(info.value).startswith("d.jsonl line 3: ")
    assert message in str(info.value)


def test_empty_and_binary_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="holds no samples"):
        read_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_conversations(tmp_path / "bin.jsonl")


def _samples(prefix: str, n: int, source: str) -> list[ConversationSample]:
    return [ConversationSample(f"{prefix}{i}", f"{i}.png", (Turn("q", "a"),), source, i + 1) for i in range(n)]


@pytest.mark.parametrize(("n", "ratio", "expected"), [(10, 1.0, 10), (10, 0.5, 5), (8, 0.25, 2), (6, 2.0, 12),
                                                      (7, 0.0, 0), (3, 0.5, 2)])
def test_cvq_mix_has_the_requested_ratio(n: int, ratio: float, expected: int) -> None:
    selected = _samples("s", n, "selected")
    vq = _samples("v", 20, "vq")
    mixed = mix_cvq(selected, vq, ratio, seed=0)
    assert cvq_count(n, ratio) == expected
    assert mixed[:n] == selected
    drawn = mixed[n:]
    assert len(drawn) == expected
    assert all(s.source == "vq" for s in drawn)
    assert len({s.id for s in drawn}) == expected  # without replacement
    assert {s.id for s in drawn} <= {s.id for s in vq}


def test_cvq_mix_is_deterministic_by_seed() -> None:
    selected, vq = _samples("s", 10, "selected"), _samples("v", 40, "vq")
    first = mix_cvq(selected, vq, 1.0, seed=3)
    assert first == mix_cvq(selected, vq, 1.0, seed=3)
    assert [s.id for s in first] != [s.id for s in mix_cvq(selected, vq, 1.0, seed=4)]


def test_cvq_mix_marks_pairs_as_vq_and_refuses_too_few() -> None:
    selected = _samples("s", 4, "selected")
    mixed = mix_cvq(selected, _samples("v", 4, "selected"), 1.0, seed=0)
    assert [s.source for s in mixed] == ["selected"] * 4 + ["vq"] * 4
    with pytest.raises(ValueError, match="needs 8 VQ pairs for 4 samples, the VQ file has 4"):
        mix_cvq(selected, _samples("v", 4, "vq"), 2.0, seed=0)
