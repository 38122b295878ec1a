"""Session fixtures shared across test trees: tiny VLM checkpoints built offline, and a LoRA adapter.

The checkpoints are random-initialised LLaVA / LLaVA-NeXT models of the real architectures
(:func:`svp.models.tiny.build_tiny_vlm`), saved like real ones, so services load them with
``from_pretrained`` on a local path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from svp.models.tiny import build_tiny_vlm

TINY_VLM_ARCHS = ("llava", "llava_next")

# Services are secure by default (production unless told otherwise). The tests build settings and
# start processes that need no API key; those that test production set it themselves.
os.environ.setdefault("SVP_ENV", "development")


@pytest.fixture(scope="session")
def single_torch_thread() -> None:
    """One torch thread in the test process: tiny models gain nothing from more, and on a shared
    machine with few cores oversubscribed threads make every forward pass many times slower."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"llava": path, "llava_next": path}``: tiny VLMs in the ``llava_v1`` chat format."""
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {arch: build_tiny_vlm(root / arch, arch, "llava_v1", seed=0) for arch in TINY_VLM_ARCHS}


def save_perturbed_lora(model_dir: Path, out_dir: Path, seed: int = 1, scale: float = 0.5,
                        target_modules: list[str] | str | None = None) -> Path:
    """A peft LoRA adapter for ``model_dir`` whose B matrices are random, so it changes outputs.
    ``target_modules`` default: every q/v projection (the vision tower's too)."""
    from peft import LoraConfig, get_peft_model

    from svp.models.loading import load_vlm

    config = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules or ["q_proj", "v_proj"])
    peft_model = get_peft_model(load_vlm(model_dir).model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_vlm_artifacts(tiny_vlm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per architecture, an artifact root holding one adapter, ``adapters/x`` (a perturbed LoRA)."""
    roots = {}
    for arch, model_dir in tiny_vlm_dirs.items():
        root = tmp_path_factory.mktemp(f"artifacts-{arch}")
        save_perturbed_lora(model_dir, root / "adapters" / "x")
        roots[arch] = root
    return roots
