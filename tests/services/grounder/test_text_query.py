"""The GroundingDINO text query, the phrase-token map and the tiny model's tokenizer, in-process."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor

from services.grounder.groundingdino import TextQuery
from services.grounder.service import normalise_phrase
from services.grounder.tiny import build_vocabulary


def test_query_is_the_original_format() -> None:
    query = TextQuery.from_phrases(["red circle", "cat", "large blue square"])
    assert query.text == "red circle . cat . large blue square ."
    assert [query.text[s:e] for s, e in query.spans] == ["red circle", "cat", "large blue square"]


def test_phrase_token_mask_maps_tokens_to_their_phrase(tiny_gdino_dir: Path) -> None:
    tokenizer = AutoProcessor.from_pretrained(tiny_gdino_dir).tokenizer
    query = TextQuery.from_phrases(["red circle", "cat", "large blue square"])
    encoded = tokenizer([query.text, "cat ."], padding="longest", return_offsets_mapping=True, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    assert tokens == ["[CLS]", "red", "circle", ".", "cat", ".", "large", "blue", "square", ".", "[SEP]"]
    mask = query.phrase_token_mask(encoded["offset_mapping"][0])
    assert mask.tolist() == [
        [False, True, True, False, False, False, False, False, False, False, False],
        [False, False, False, False, True, False, False, False, False, False, False],
        [False, False, False, False, False, False, True, True, True, False, False],
    ]
    # Padding tokens of a shorter query in the same batch belong to no phrase.
    short = TextQuery.from_phrases(["cat"]).phrase_token_mask(encoded["offset_mapping"][1])
    assert short.tolist() == [[False, True] + [False] * 9]


def test_tiny_vocabulary_keeps_bert_delimiter_ids(tiny_gdino_dir: Path) -> None:
    # GroundingDINO's modelling code splits phrases at these bert-base-uncased ids.
    tokenizer = AutoProcessor.from_pretrained(tiny_gdino_dir).tokenizer
    assert tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?", "[PAD]"]) == [101, 102, 1012, 1029, 0]
    vocab = build_vocabulary(["Circle", "circle", "cat"])
    assert vocab[1030:] == ["circle", "cat"]
    assert torch.equal(
        tokenizer("a cat .", return_tensors="pt")["input_ids"][0, [0, -2, -1]], torch.tensor([101, 1012, 102])
    )


def test_normalise_phrase() -> None:
    assert normalise_phrase("  Large   RED circle ") == "large red circle"
    assert normalise_phrase("st. james") == "st james"
    assert normalise_phrase(" . ") == ""
