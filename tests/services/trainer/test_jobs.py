"""A real uvicorn trainer with a tiny LLaVA: jobs train, publish adapters, mix CVQ, continue, cancel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import PeftModel

from svp.client import APIError, TrainerClient
from svp.contract import TrainingJobCreate
from svp.models.loading import load_vlm
from svp.training.dataset import ConversationSample, read_conversations
from tests.services.trainer.conftest import FAST, N_SAMPLES, TrainerEnv, wait_for_state, wait_for_step
from tests.svp.training.fixtures import target_logprob, write_vq

SELECTED = "runs/r1/selected.jsonl"


def _resolved(roots: TrainerEnv) -> list[ConversationSample]:
    samples = read_conversations(roots.artifact_root / SELECTED)
    return [ConversationSample(s.id, str(roots.data_root / s.image), s.turns, s.source, s.line) for s in samples]


def test_job_trains_publishes_and_raises_target_likelihood(
    client: TrainerClient, roots: TrainerEnv, tiny_llava_dir: Path
) -> None:
    job = client.create_job(TrainingJobCreate(base_model=str(tiny_llava_dir), dataset_path=SELECTED,
                                              output_name="r1-round1", config=FAST, merge=True))
    assert job.state == "queued" and job.config == FAST
    done = wait_for_state(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.state == "succeeded", done.error
    assert done.progress.step == done.progress.total_steps == 10
    assert done.progress.samples_per_s and done.progress.samples_per_s > 0 and done.progress.eta_s == 0
    assert done.metrics["dataset_samples"] == N_SAMPLES and done.metrics["vq_samples"] == 0
    assert done.metrics["final_loss"] < done.metrics["first_loss"] - 0.3
    adapter = roots.artifact_root / "adapters" / "r1-round1"
    assert done.adapter_name == "r1-round1" and Path(done.adapter_path or "") == adapter
    assert Path(done.merged_path or "") == roots.artifact_root / "merged" / "r1-round1"

    steps = [json.loads(line) for line in (adapter / "training_log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 11))
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3
    saved = json.loads((adapter / "training_config.json").read_text())
    assert saved["config"] == FAST.model_dump(mode="json") and saved["job_id"] == job.id
    assert saved["request"]["dataset_path"] == SELECTED
    assert not any((roots.artifact_root / "trainer" / "work").iterdir())

    samples = _resolved(roots)
    vlm = load_vlm(tiny_llava_dir)
    before = target_logprob(vlm, samples)
    vlm.model = PeftModel.from_pretrained(vlm.model, str(adapter))
    after = target_logprob(vlm, samples)
    assert after > before + 10.0, (before, after)
    # The sampler and scorer load it by name, through the same loader they serve with.
    served = load_vlm(tiny_llava_dir)
    served.load_adapter("r1-round1", roots.artifact_root)
    with served.use_adapter("r1-round1"):
        assert target_logprob(served, samples) == pytest.approx(after, rel=1e-5)
    merged = load_vlm(done.merged_path or "")
    assert target_logprob(merged, samples) == pytest.approx(after, rel=1e-4)

    listed = client.list_jobs()
    assert job.id in {j.id for j in listed.data} and listed.count == len(listed.data)
    # The record is on disk, as the next start of the service will read it.
    assert (roots.artifact_root / "trainer" / "jobs" / f"{job.id}.json").is_file()


def test_cvq_job_mixes_the_requested_ratio(client: TrainerClient, roots: TrainerEnv, tiny_llava_dir: Path) -> None:
    write_vq(roots.data_root, roots.data_root / "vq" / "pairs.jsonl", 12)
    config = FAST.model_copy(update={"cvq_ratio": 0.5, "max_steps": 1})
    request = TrainingJobCreate(base_model=str(tiny_llava_dir), dataset_path=SELECTED,
                                vq_dataset_path="vq/pairs.jsonl", output_name="r1-cvq", config=config)
    job = client.create_job(request)
    done = wait_for_state(client, job.id, ("succeeded", "failed"))
    assert done.state == "succeeded", done.error
    assert client.create_job(request).id == job.id  # a retried POST is idempotent
    assert done.metrics["dataset_samples"] == N_SAMPLES + N_SAMPLES // 2
    assert done.metrics["vq_samples"] == N_SAMPLES // 2
    saved = json.loads((roots.artifact_root / "adapters" / "r1-cvq" / "training_config.json").read_text())
    assert (saved["selected_samples"], saved["vq_samples"]) == (N_SAMPLES, N_SAMPLES // 2)


def test_continue_from_parent_adapter(client: TrainerClient, roots: TrainerEnv, tiny_llava_dir: Path) -> None:
    parent = client.create_job(TrainingJobCreate(base_model=str(tiny_llava_dir), dataset_path=SELECTED,
                                                 output_name="cont-r1", config=FAST))
    parent_done = wait_for_state(client, parent.id, ("succeeded", "failed"))
    assert parent_done.state == "succeeded", parent_done.error
    child = client.create_job(TrainingJobCreate(
        base_model=str(tiny_llava_dir), dataset_path=SELECTED, parent_adapter="cont-r1", output_name="cont-r2",
        config=FAST.model_copy(update={"max_steps": 1, "warmup_ratio": 0.0})))
    child_done = wait_for_state(client, child.id, ("succeeded", "failed"))
    assert child_done.state == "succeeded", child_done.error
    # Round 2 starts from round 1's adapter: its first loss is round 1's trained level, not the base's.
    assert child_done.metrics["first_loss"] < parent_done.metrics["first_loss"] - 0.3
    with pytest.raises(APIError) as info:
        client.create_job(TrainingJobCreate(base_model=str(tiny_llava_dir), dataset_path=SELECTED,
                                            parent_adapter="cont-r1", output_name="cont-r3",
                                            config=FAST.model_copy(update={"lora_r": 4})))
    assert info.value.status == 400 and info.value.error and info.value.error.error.param == "config"


def test_cancel_running_and_queued_jobs(client: TrainerClient, roots: TrainerEnv, tiny_llava_dir: Path) -> None:
    long = FAST.model_copy(update={"epochs": 100})  # 200 steps: far longer than the test waits
    running = client.create_job(TrainingJobCreate(base_model=str(tiny_llava_dir), dataset_path=SELECTED,
                                                  output_name="long-1", config=long))
    queued_request = TrainingJobCreate(base_model=str(tiny_llava_dir), dataset_path=SELECTED,
                                       output_name="long-2", config=long)
    queued = client.create_job(queued_request)
    assert client.create_job(queued_request).id == queued.id  # same request: the same job, not a second one
    with pytest.raises(APIError) as conflict:  # another request for the same output: a conflict
        client.create_job(queued_request.model_copy(update={"merge": True}))
    assert conflict.value.status == 409
    wait_for_step(client, running.id, 2)
    assert client.get_job(queued.id).state == "queued"  # one job at a time
    assert client.cancel_job(queued.id).state == "cancelled"
    client.cancel_job(running.id)
    stopped = wait_for_state(client, running.id, ("cancelled", "failed", "succeeded"), timeout_s=60)
    assert stopped.state == "cancelled" and stopped.progress.step < stopped.progress.total_steps
    assert client.get_job(queued.id).state == "cancelled"  # the worker skipped it
    for job in (running, queued):
        assert not (roots.artifact_root / "adapters" / job.request.output_name).exists()
        with pytest.raises(APIError) as info:
            client.cancel_job(job.id)
        assert info.value.status == 409
    assert not any((roots.artifact_root / "trainer" / "work").iterdir())
