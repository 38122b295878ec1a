"""The vLLM sampling engine.

On CPU: what it shares with the transformers engine without vLLM — unexpanded prompt ids that
expand to the processor's, which adapters vLLM can serve, the settings, and a clear load error
where vLLM is missing. On a CUDA machine with vLLM (``-m gpu``): vLLM and the transformers engine
on the same tiny LLaVA, float32 on both sides, give the same greedy tokens, the same raw log-probs
(sampled continuations against teacher forcing), the same top log-probs and the same adapted
outputs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from services.sampler.service import SamplerService
from services.sampler.settings import Settings
from svp.contract import ImageInput, SampleRequest, SampleResponse
from svp.models.engine import GeneratedSample, GenerationJob, TransformersEngine
from svp.models.loading import InvalidInputError, load_prompter, load_vlm
from svp.models.tiny import build_tiny_vlm
from svp.models.vllm_engine import UnsupportedAdapterError, lora_servable, vllm_checkpoint
from tests.conftest import save_perturbed_lora

HAS_VLLM = importlib.util.find_spec("vllm") is not None
IMAGE = Image.new("RGB", (40, 30), "red")
def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


CONTEXT = "red circle: [0.10, 0.20, 0.30, 0.40]\nblue square: [0.50, 0.50, 0.90, 0.80]"


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_unexpanded_prompt_ids_expand_to_the_processors(tiny_vlm_dirs: dict[str, Path], arch: str) -> None:
    vlm = load_vlm(tiny_vlm_dirs[arch])
    for kind, context in (("base", ""), ("grounded", CONTEXT)):
        ids = vlm.prompt_token_ids(kind, context)
        expanded = vlm.prompt_inputs(IMAGE, kind, context).input_ids.tolist()
        assert ids.count(vlm.image_token_id) == 1
        # vLLM replaces the one placeholder by the image's tokens: the processor's ids come back.
        at, n = ids.index(vlm.image_token_id), expanded.count(vlm.image_token_id)
        assert ids[:at] + [vlm.image_token_id] * n + ids[at + 1 :] == expanded


def test_the_prompter_alone_renders_what_the_loaded_model_renders(tiny_vlm_dirs: dict[str, Path]) -> None:
    prompter, vlm = load_prompter(tiny_vlm_dirs["llava"]), load_vlm(tiny_vlm_dirs["llava"])
    assert prompter.render_prompt("grounded", CONTEXT) == vlm.render_prompt("grounded", CONTEXT)
    assert prompter.stop_token_ids == vlm.stop_token_ids
    assert prompter.suppressed_token_ids == vlm.suppressed_token_ids
    assert vlm.image_token_id in prompter.suppressed_token_ids


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA whose decoder heads are 32 wide: vLLM's Triton attention takes no narrower head."""
    return build_tiny_vlm(tmp_path_factory.mktemp("vllm-model") / "llava", "llava", seed=0, hidden_size=128,
                          intermediate_size=256, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def language_model_adapter(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact root with ``adapters/lm``: a perturbed LoRA on the language model's linear layers,
    what the trainer writes."""
    from svp.training.lora import language_model_target

    root = tmp_path_factory.mktemp("lm-adapter")
    save_perturbed_lora(vllm_model_dir, root / "adapters" / "lm",
                        target_modules=language_model_target(load_vlm(vllm_model_dir).model))
    return root


def test_our_checkpoints_get_the_tower_names_vllm_loads(vllm_model_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    copy = Path(vllm_checkpoint(str(vllm_model_dir), tmp_path))
    with safe_open(str(copy / "model.safetensors"), framework="pt") as f:
        tower = [k for k in f.keys() if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    ours, theirs = load_vlm(vllm_model_dir).model.state_dict(), load_vlm(copy).model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert vllm_checkpoint(str(copy), tmp_path) == str(copy)  # already in vLLM's names
    assert vllm_checkpoint("llava-hf/llava-1.5-7b-hf", tmp_path) == "llava-hf/llava-1.5-7b-hf"


def test_vllm_serves_lora_on_the_language_model_only(language_model_adapter: Path, tiny_vlm_artifacts: dict[str, Path],
                                                    tmp_path: Path) -> None:
    adapter = language_model_adapter / "adapters" / "lm"
    lora_servable(adapter)  # the trainer's kind of adapter
    projector = tmp_path / "p"
    shutil.copytree(adapter, projector)
    config = json.loads((projector / "adapter_config.json").read_text())
    (projector / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["multi_modal_projector"]}))
    with pytest.raises(UnsupportedAdapterError, match="merge=true"):
        lora_servable(projector)
    with pytest.raises(UnsupportedAdapterError, match="vision_tower"):  # q/v of every layer, the tower's too
        lora_servable(tiny_vlm_artifacts["llava"] / "adapters" / "x")
    assert issubclass(UnsupportedAdapterError, InvalidInputError)  # a 400 naming the way out, not a 500


def test_vllm_settings_follow_the_sampler_settings(tiny_vlm_dirs: dict[str, Path]) -> None:
    settings = Settings(model=str(tiny_vlm_dirs["llava"]), engine="vllm", vllm_max_lora_rank=16)
    options = settings.vllm_options()
    assert options.dtype == "bfloat16" and options.max_lora_rank == 16  # "auto" as the transformers engine on CUDA
    assert Settings(model="m", engine="vllm", dtype="float32").vllm_options().dtype == "float32"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_vllm_sampler_reports_why_it_cannot_load(tiny_vlm_dirs: dict[str, Path]) -> None:
    async def health() -> str | None:
        service = SamplerService(Settings(model=str(tiny_vlm_dirs["llava"]), engine="vllm"))
        await service.start()
        await service.wait_loaded()
        await service.stop()
        status = service.health()
        assert status.status == "error"
        return status.detail

    assert "pip install -e '.[gpu]'" in (asyncio.run(health()) or "")


# ---------------------------------------------------------------- on a GPU with vLLM

needs_vllm_gpu = pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs CUDA and vLLM")


def job(**overrides: object) -> GenerationJob:
    fields: dict[str, object] = dict(image=IMAGE, prompt_kind="base", context="", n=1, temperature=0.0, top_p=1.0,
                                     max_new_tokens=24, seed=0, top_logprobs=0, adapter=None)
    return GenerationJob(**{**fields, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def image_token_model(vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA with the image placeholder's output row set to 1.5x the row of the token
    greedy decoding starts with: the raw distribution's top token at step 0 is the placeholder,
    which neither engine may generate."""
    out = tmp_path_factory.mktemp("vllm") / "llava"
    shutil.copytree(vllm_model_dir, out)
    first = TransformersEngine(load_vlm(out)).generate([job(max_new_tokens=1)])[0]
    assert not isinstance(first, Exception)
    weights = load_file(str(out / "model.safetensors"))
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    image_token = load_prompter(out).image_token_id
    weights[head][image_token] = 1.5 * weights[head][first[0].token_ids[0]]
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: vLLM's AsyncLLM binds its output handler to the loop of its
    first request, as a service's does for the service's lifetime."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# Triton paged attention and SDPA in the encoder: both run float32 (FlashAttention does not).
VLLM_TEST_OPTIONS = dict(dtype="float32", gpu_memory_utilization=0.25, enforce_eager=True, max_lora_rank=8,
                         attention_backend="TRITON_ATTN", mm_encoder_attention_backend="TORCH_SDPA")


@pytest.fixture(scope="module")
def engines(image_token_model: Path):
    from svp.models.vllm_engine import VLLMEngine, VLLMOptions

    vllm_engine = VLLMEngine.create(str(image_token_model), VLLMOptions(**VLLM_TEST_OPTIONS))  # type: ignore[arg-type]
    reference = TransformersEngine(load_vlm(image_token_model, device="cuda", dtype=torch.float32))
    yield vllm_engine, reference
    vllm_engine.shutdown()


def run_both(engines, loop, jobs: list[GenerationJob]) -> tuple[list[list[GeneratedSample]], list[list[GeneratedSample]]]:
    vllm_engine, reference = engines

    async def all_vllm():
        return await asyncio.gather(*(vllm_engine.generate_async(j) for j in jobs))

    ours = reference.generate(jobs)
    assert not any(isinstance(o, Exception) for o in ours)
    return loop.run_until_complete(all_vllm()), ours  # type: ignore[return-value]


@pytest.mark.gpu
@needs_vllm_gpu
def test_greedy_samples_and_logprobs_equal_the_transformers_engines(engines, loop) -> None:
    jobs = [job(), job(prompt_kind="grounded", context=CONTEXT), job(image=Image.new("RGB", (64, 48), "blue"))]
    got, want = run_both(engines, loop, jobs)
    image_token = engines[1].image_token_id
    for g, w in zip(got, want, strict=True):
        assert g[0].token_ids == w[0].token_ids and g[0].text == w[0].text
        assert g[0].finish_reason == w[0].finish_reason
        assert image_token not in g[0].token_ids
        # float32 on both sides; the kernels (Triton paged attention vs SDPA) sum in another order.
        torch.testing.assert_close(torch.tensor(g[0].logprobs), torch.tensor(w[0].logprobs), atol=1e-3, rtol=0)


@pytest.mark.gpu
@needs_vllm_gpu
def test_top_logprobs_are_the_raw_distributions_placeholder_included(engines, loop) -> None:
    got, want = run_both(engines, loop, [job(top_logprobs=5, max_new_tokens=6)])
    g, w = got[0][0], want[0][0]
    assert g.token_ids == w.token_ids and g.top_logprobs is not None and w.top_logprobs is not None
    assert g.top_logprobs[0][0][0] == engines[1].image_token_id  # most likely raw, never generated
    vlm = engines[1].vlm
    full = vlm.continuation_logprobs([vlm.prompt_inputs(IMAGE, "base")], [0], [w.token_ids])[0][0].cpu()
    for t, (g_step, w_step) in enumerate(zip(g.top_logprobs, w.top_logprobs, strict=True)):
        # The same top-k values; where two tokens tie within float32 noise their order may differ,
        # so each token vLLM names must have the value it states in the reference distribution.
        torch.testing.assert_close(torch.tensor([v for _, v in g_step]), torch.tensor([v for _, v in w_step]),
                                   atol=1e-3, rtol=0)
        torch.testing.assert_close(torch.tensor([v for _, v in g_step]), full[t, [i for i, _ in g_step]],
                                   atol=1e-3, rtol=0)


@pytest.mark.gpu
@needs_vllm_gpu
def test_sampled_logprobs_equal_teacher_forcing_and_seeds_reproduce(engines, loop) -> None:
    vllm_engine, reference = engines
    sampled = job(n=8, temperature=1.0, top_p=0.9, seed=7, prompt_kind="grounded", context=CONTEXT)

    async def twice():
        return await asyncio.gather(vllm_engine.generate_async(sampled), vllm_engine.generate_async(sampled))

    first, again = loop.run_until_complete(twice())
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    assert len({tuple(s.token_ids) for s in first}) > 1
    vlm = reference.vlm
    prompt = vlm.prompt_inputs(IMAGE, "grounded", CONTEXT)
    rows = [s for s in first if s.token_ids]
    logq, ids, _ = vlm.continuation_logprobs([prompt], [0] * len(rows), [s.token_ids for s in rows])
    forced = logq.gather(-1, ids[..., None])[..., 0].cpu()
    for r, s in enumerate(rows):
        assert engines[1].image_token_id not in s.token_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), forced[r, : len(s.logprobs)], atol=1e-3, rtol=0)


@pytest.mark.gpu
@needs_vllm_gpu
def test_an_adapter_changes_outputs_as_peft_does(engines, loop, language_model_adapter: Path) -> None:
    for engine in engines:
        engine.load_adapter("lm", language_model_adapter)
    jobs = [job(adapter="lm"), job(adapter="lm", prompt_kind="grounded", context=CONTEXT), job()]
    got, want = run_both(engines, loop, jobs)
    assert got[0][0].token_ids != got[2][0].token_ids  # the adapter changes the output
    for g, w in zip(got, want, strict=True):
        assert g[0].token_ids == w[0].token_ids
        # vLLM applies the LoRA matrices in bfloat16 (its kernels take no float32 adapter): the
        # log-probs agree to bfloat16's precision, not float32's.
        torch.testing.assert_close(torch.tensor(g[0].logprobs), torch.tensor(w[0].logprobs), atol=3e-2, rtol=0)


@pytest.mark.gpu
@needs_vllm_gpu
def test_the_sampler_service_serves_vllm_samples_like_the_transformers_engine(engines, loop, image_token_model: Path,
                                                                             tmp_path: Path) -> None:
    """The service path: the engine created on the model thread, requests awaited on the event loop."""
    settings = Settings(model=str(image_token_model), engine="vllm", dtype="float32", artifact_root=tmp_path,
                        **{f"vllm_{k}": v for k, v in VLLM_TEST_OPTIONS.items() if k != "dtype"})
    service = SamplerService(settings)
    request = SampleRequest(image=ImageInput.from_bytes(png(IMAGE)), n=1, temperature=0.0, max_new_tokens=24,
                            seed=0, top_logprobs=2)

    async def serve() -> tuple[SampleResponse, list[SampleResponse]]:
        await service.start()
        await service.wait_loaded()
        assert service.health().status == "ok", service.health().detail
        try:
            one = await service.generate(request)
            many = await asyncio.gather(*(service.generate(request) for _ in range(8)))
        finally:
            await service.stop()
        return one, list(many)

    one, many = loop.run_until_complete(serve())
    want = engines[1].generate([job(top_logprobs=2)])[0]
    assert not isinstance(want, Exception)
    assert [s.token_ids for s in one.samples] == [s.token_ids for s in want]
    assert all([s.token_ids for s in r.samples] == [s.token_ids for s in want] for r in many)
    assert one.model == str(image_token_model) and one.samples[0].top_logprobs is not None
