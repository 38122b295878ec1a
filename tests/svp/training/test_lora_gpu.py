"""The GPU path: bf16 autocast with float32 LoRA weights (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from svp.models.loading import load_vlm
from svp.training.dataset import ConversationSample
from svp.training.lora import train_lora
from tests.svp.training.fixtures import target_logprob
from tests.svp.training.test_lora import FAST

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
def test_mixed_precision_training_on_gpu(tiny_llava_dir: Path, scene_samples: list[ConversationSample],
                                         tmp_path: Path) -> None:
    vlm = load_vlm(tiny_llava_dir, device="cuda", dtype=torch.float32)
    result = train_lora(vlm, scene_samples, FAST, tmp_path / "adapter")
    assert result.metrics["final_loss"] < result.metrics["first_loss"] - 0.3
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())
    # The adapter trained under autocast on GPU raises the targets' likelihood on CPU in float32.
    base = load_vlm(tiny_llava_dir)
    before = target_logprob(base, scene_samples)
    base.model = PeftModel.from_pretrained(base.model, str(tmp_path / "adapter"))
    assert target_logprob(base, scene_samples) > before + 10.0
