"""Fixtures of the training-library tests: tiny VLM checkpoints and a small scene dataset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from svp.models.tiny import build_tiny_vlm
from svp.training.dataset import ConversationSample, read_conversations
from tests.svp.training.fixtures import write_selected


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices on a 2-core machine shared with other test runs: one thread is ~10x faster
    than threads spinning against each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-llava"), arch="llava", chat_format="llava_v1", seed=0)


@pytest.fixture(scope="session")
def scene_samples(tmp_path_factory: pytest.TempPathFactory) -> list[ConversationSample]:
    """Eight scene samples with image paths resolved (absolute)."""
    root = tmp_path_factory.mktemp("scenes")
    samples = read_conversations(write_selected(root, root / "selected.jsonl", 8))
    return [ConversationSample(s.id, str(root / s.image), s.turns, s.source, s.line) for s in samples]
