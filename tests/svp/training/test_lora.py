"""The LoRA loop on a tiny LLaVA: it learns, saves a loadable adapter, trains only what it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from svp.contract import TrainingConfig, TrainingProgress
from svp.models.loading import load_vlm
from svp.models.tiny import build_tiny_vlm
from svp.training.dataset import ConversationSample
from svp.training.lora import (
    ADAPTER_CONFIG,
    ADAPTER_LOG,
    TrainingCancelled,
    language_model_target,
    sample_order,
    total_steps,
    train_lora,
)
from tests.svp.training.fixtures import target_logprob

# A frozen random lm_head bounds how far a tiny random model's loss can fall (its logits span about
# one nat), so the checks ask for a clear decrease, not a small loss.
FAST = TrainingConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=2e-2, epochs=5, batch_size=4,
                      micro_batch_size=2, warmup_ratio=0.1, max_length=512)


def test_steps_and_sample_order() -> None:
    config = TrainingConfig(batch_size=4, micro_batch_size=2, epochs=2.5)
    assert total_steps(10, config) == 7  # ceil(2.5 * 10 / 4)
    assert total_steps(10, config.model_copy(update={"max_steps": 3})) == 3
    order = sample_order(10, 7, config)
    assert len(order) == 25
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order[:10] != order[10:20]  # a fresh permutation per epoch
    assert order == sample_order(10, 7, config)


def test_training_lowers_loss_and_raises_target_likelihood(
    tiny_llava_dir: Path, scene_samples: list[ConversationSample], tmp_path: Path
) -> None:
    progress: list[TrainingProgress] = []
    vlm = load_vlm(tiny_llava_dir)
    result = train_lora(vlm, scene_samples, FAST, tmp_path / "adapter", record={"job_id": "j1"},
                        on_progress=progress.append)
    steps = total_steps(len(scene_samples), FAST)
    assert [p.step for p in progress] == list(range(1, steps + 1))
    assert all(p.total_steps == steps and p.samples_per_s and p.samples_per_s > 0 for p in progress)
    assert progress[-1].eta_s == 0
    assert result.metrics["final_loss"] < result.metrics["first_loss"] - 0.3
    # The warm-up starts at lr 0, reaches the peak, then the cosine decays it.
    lrs = [p.learning_rate for p in progress]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(FAST.learning_rate) and lrs[-1] < 0.1 * FAST.learning_rate

    log_lines = [json.loads(line) for line in (tmp_path / "adapter" / ADAPTER_LOG).read_text().splitlines()]
    assert [entry["step"] for entry in log_lines] == list(range(1, steps + 1))
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert TrainingConfig.model_validate(saved["config"]) == FAST and saved["job_id"] == "j1"

    base = load_vlm(tiny_llava_dir)
    before = target_logprob(base, scene_samples)
    base.model = PeftModel.from_pretrained(base.model, str(tmp_path / "adapter"))
    after = target_logprob(base, scene_samples)
    assert after > before + 10.0, (before, after)


def test_only_language_model_lora_trains(tiny_llava_dir: Path, scene_samples: list[ConversationSample],
                                         tmp_path: Path) -> None:
    vlm = load_vlm(tiny_llava_dir)
    frozen = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    config = FAST.model_copy(update={"epochs": 1})
    train_lora(vlm, scene_samples, config, tmp_path / "adapter")
    trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    # Every linear layer of the language model (and nothing else) carries LoRA.
    assert {n.split(".lora_")[0] for n in trainable} == {
        f"base_model.model.{n}" for n, m in load_vlm(tiny_llava_dir).model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.")
    }
    after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in vlm.model.state_dict().items() if "lora_" not in k}
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)  # vision tower, projector, LM weights intact
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)


def test_train_projector_saves_a_trained_projector(tiny_llava_dir: Path, scene_samples: list[ConversationSample],
                                                   tmp_path: Path) -> None:
    vlm = load_vlm(tiny_llava_dir)
    before = vlm.model.model.multi_modal_projector.linear_1.weight.clone()
    config = FAST.model_copy(update={"epochs": 1, "train_projector": True})
    train_lora(vlm, scene_samples, config, tmp_path / "adapter")
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["multi_modal_projector"]
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    projector = [k for k in weights if "multi_modal_projector" in k]
    assert projector
    trained = next(v for k, v in weights.items() if k.endswith("multi_modal_projector.linear_1.weight"))
    assert not torch.equal(trained, before)


def test_activation_checkpointing_gives_the_same_update(
    tiny_llava_dir: Path, scene_samples: list[ConversationSample], tmp_path: Path
) -> None:
    config = FAST.model_copy(update={"max_steps": 2, "warmup_ratio": 0.0})
    plain = train_lora(load_vlm(tiny_llava_dir), scene_samples, config, tmp_path / "plain")
    vlm = load_vlm(tiny_llava_dir)
    checkpointed = train_lora(vlm, scene_samples, config, tmp_path / "ckpt", activation_checkpointing=True)
    assert vlm.model.base_model.model.model.language_model.gradient_checkpointing
    assert checkpointed.metrics["final_loss"] == pytest.approx(plain.metrics["final_loss"], rel=1e-5)
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-6)


def test_llava_next_trains(tmp_path: Path, scene_samples: list[ConversationSample]) -> None:
    # Any-resolution tiles (5-D pixel values + image sizes) through the same loop.
    model_dir = build_tiny_vlm(tmp_path / "next", arch="llava_next", chat_format="mistral_instruct")
    result = train_lora(load_vlm(model_dir), scene_samples, FAST, tmp_path / "adapter")
    assert result.metrics["final_loss"] < result.metrics["first_loss"] - 0.3


def test_gradient_accumulation_equals_one_big_batch(tiny_llava_dir: Path, scene_samples: list[ConversationSample],
                                                    tmp_path: Path) -> None:
    # One optimiser step over 4 samples: whole, in 2 micro batches, in 4 — the same update.
    weights = []
    for micro in (4, 2, 1):
        config = TrainingConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2, batch_size=4,
                                micro_batch_size=micro, warmup_ratio=0.0, max_steps=1, max_length=512)
        train_lora(load_vlm(tiny_llava_dir), scene_samples[:4], config, tmp_path / f"m{micro}")
        weights.append(load_file(str(tmp_path / f"m{micro}" / "adapter_model.safetensors")))
    for other in weights[1:]:
        for key, value in weights[0].items():
            torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-6)
    # LoRA's B matrices start at zero: non-zero ones show the step above compared trained weights.
    assert any(float(v.abs().sum()) > 0 for k, v in weights[0].items() if "lora_B" in k)


def test_continue_from_parent_adapter(tiny_llava_dir: Path, scene_samples: list[ConversationSample],
                                      tmp_path: Path) -> None:
    first = train_lora(load_vlm(tiny_llava_dir), scene_samples, FAST, tmp_path / "round1")
    config = FAST.model_copy(update={"max_steps": 1, "warmup_ratio": 0.0})
    second = train_lora(load_vlm(tiny_llava_dir), scene_samples, config, tmp_path / "round2",
                        parent_adapter=tmp_path / "round1")
    # Round 2 starts where round 1 ended, not from the base model's loss.
    assert second.metrics["first_loss"] < first.metrics["first_loss"] - 0.3
    assert json.loads((tmp_path / "round2" / "adapter_config.json").read_text())["r"] == FAST.lora_r


def test_cancel_between_steps(tiny_llava_dir: Path, scene_samples: list[ConversationSample], tmp_path: Path) -> None:
    seen: list[TrainingProgress] = []
    with pytest.raises(TrainingCancelled, match="before step 3"):
        train_lora(load_vlm(tiny_llava_dir), scene_samples, FAST, tmp_path / "a",
                   on_progress=seen.append, should_stop=lambda: len(seen) >= 2)
    assert [p.step for p in seen] == [1, 2]
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_merged_model_matches_adapter(tiny_llava_dir: Path, scene_samples: list[ConversationSample],
                                      tmp_path: Path) -> None:
    config = FAST.model_copy(update={"epochs": 1})
    train_lora(load_vlm(tiny_llava_dir), scene_samples, config, tmp_path / "adapter", merged_dir=tmp_path / "merged")
    with_adapter = load_vlm(tiny_llava_dir)
    with_adapter.model = PeftModel.from_pretrained(with_adapter.model, str(tmp_path / "adapter"))
    merged = load_vlm(tmp_path / "merged")  # model + processor, loadable by tools that know no adapters
    assert merged.chat_format == with_adapter.chat_format
    assert target_logprob(merged, scene_samples) == pytest.approx(target_logprob(with_adapter, scene_samples),
                                                                  rel=1e-4)


def test_target_regex_covers_language_model_only(tiny_llava_dir: Path) -> None:
    import re

    model = load_vlm(tiny_llava_dir).model
    pattern = re.compile(language_model_target(model))
    matched = {n for n, _ in model.named_modules() if pattern.fullmatch(n)}
    assert matched and all(n.startswith("model.language_model.") for n in matched)
    assert "lm_head" not in matched
