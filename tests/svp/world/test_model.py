"""The base-VLM code at the seconds-scale configuration (the full model is built by `svp world build`)."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from svp.cli import app
from svp.evaluation.generation import first_token_ids, question_inputs, yes_no_margins
from svp.evaluation.suite import EvalOptions, evaluate_coco, evaluate_world
from svp.models.loading import load_vlm
from svp.prompts import PAPER_PROMPTS, build_messages
from svp.world.build import WORLD_VERSION, ensure_world
from svp.world.language import canonical_caption
from svp.world.model import (
    IGNORE_INDEX,
    AnswerProbes,
    DecoderStalled,
    ExampleSampler,
    PromptEncoder,
    WorldModelConfig,
    answer_loss,
    attribute_losses,
    bf16_emulation_warning,
    cell_targets,
    instruction_tune,
    kind_class,
    kinds_present,
    length_chunks,
    lr_factor,
    pixel_tensor,
    prefix_length,
    probe_tune,
    question_messages,
    reinitialise_decoder,
    shared_prefix,
    train_world_vlm,
    training_grounding,
    vision_in_float32,
)
from svp.world.premise import premise_check
from svp.world.scenes import SHAPES, generate_scene, generate_scenes, obscure_shapes

FAST = EvalOptions(batch_size=8, caption_tokens=24, answer_tokens=6, meteor=False, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(tmp_path_factory.mktemp("world"), scale="ci", progress=False)


@pytest.fixture(scope="module")
def vlm(world):
    return load_vlm(world.model_dir)


def test_build_writes_versioned_layout_and_is_reused(world):
    assert world.root.name == f"{WORLD_VERSION}-ci"
    assert (world.model_dir / "config.json").is_file() and (world.model_dir / "train_report.json").is_file()
    assert (world.data_dirs["test"] / "captions_coco.json").is_file()
    assert not (world.data_dirs["unlabelled"] / "scenes.json").exists()
    first = json.loads((world.data_dirs["train"] / "vq_pairs.jsonl").read_text().splitlines()[0])
    assert first["conversations"][0]["value"].startswith("<image>\nIs there")
    stamp = (world.root / "build.json").stat().st_mtime_ns
    again = ensure_world(world.root.parent, scale="ci", progress=False)
    assert (again.root / "build.json").stat().st_mtime_ns == stamp
    report = json.loads((world.model_dir / "train_report.json").read_text())
    # training lowered the answer loss from about log(vocab) at initialisation
    assert report["loss"] < 4.0 and report["parameters"] > 0
    # build.json says what ran, on what, and the gate it passed
    build = json.loads((world.root / "build.json").read_text())
    ci = WorldModelConfig.ci()
    assert build["steps"] == ci.copy_steps + ci.steps and build["seed"] == 0
    # stage 3 ran, and its time counts in the build's
    assert build["probe_seconds"] > 0 and 0 < build["pope_loss"] < 20
    assert build["training_seconds"] == pytest.approx(
        build["vision_seconds"] + build["tuning_seconds"] + build["probe_seconds"])
    assert build["environment"]["versions"]["torch"] == torch.__version__
    assert build["environment"]["precision"] in ("float32", "bfloat16 autocast (decoder)")
    assert build["attempts"][-1]["failures"] == [] and "all_boxed" in build["gate"]


def test_stage_one_reads_shape_and_colour_above_chance(world):
    """A collapsed tower reads content at the attributes' prior (shape 1/4, colour 1/6): the
    held-out read-out of even the seconds-scale tower must be clearly above it."""
    gate = world.build["gate"]
    assert gate["readout_shape"] > 0.25 + 0.1
    assert gate["readout_colour"] > 1 / 6 + 0.1
    assert gate["readout_occupied"] > 0.7


def test_build_options_change_only_what_they_name():
    from svp.world.build import scale_spec

    full = WorldModelConfig.full()
    spec = scale_spec("full", seed=3, precision="float32", threads=1, pope_steps=300)
    assert dataclasses.replace(spec.model, seed=0, bf16=False, threads=2, probe_steps=600) == full
    assert (spec.model.seed, spec.model.bf16, spec.model.threads, spec.model.probe_steps) == (3, False, 1, 300)
    assert scale_spec("full").model == full and full.probe_steps == 600  # stage 3 is on unless turned off
    assert scale_spec("full", pope_steps=0).model == dataclasses.replace(full, probe_steps=0)
    assert scale_spec("ci").model.probe_steps == WorldModelConfig.ci().probe_steps > 0  # CI runs it


def test_a_build_that_fails_the_gate_is_retried_with_another_seed_then_refused(tmp_path):
    from svp.world.build import SCALES, WorldGateError, ensure_world
    from svp.world.gate import GateThresholds

    spec = SCALES["ci"]
    impossible = dataclasses.replace(spec, attempts=2, gate=GateThresholds(min_readout={"shape": 1.01}, scenes=4))
    # the retry's seed is no other build's first seed: builds of seeds 0 and 1 stay independent
    with pytest.raises(WorldGateError, match=r"2 attempts \(seeds 0, 100000\)") as failed:
        ensure_world(tmp_path, scale=impossible, progress=False)
    assert "seed 0 (vision)" in str(failed.value) and "seed 100000 (vision)" in str(failed.value)
    assert "shape" in str(failed.value)
    # a decoder still blind to the image after its restarts fails its seed too
    blind = dataclasses.replace(spec, attempts=1, model=dataclasses.replace(
        spec.model, stall_check_step=5, stall_loss_ratio=0.01, max_decoder_restarts=1))
    with pytest.raises(WorldGateError, match=r"seed 0 \(decoder\): decoder still blind"):
        ensure_world(tmp_path, scale=blind, progress=False)
    assert not (tmp_path / f"{WORLD_VERSION}-ci" / "build.json").exists()  # nothing is cached
    # a model that trains but fails the gate is kept, not overwritten by the next attempt's
    unreachable = dataclasses.replace(spec, attempts=2, gate=dataclasses.replace(spec.gate, min_recall=1.01))
    with pytest.raises(WorldGateError, match="failed-attempts"):
        ensure_world(tmp_path, scale=unreachable, progress=False)
    kept = tmp_path / f"{WORLD_VERSION}-ci" / "failed-attempts"
    assert sorted(p.name for p in kept.iterdir()) == ["seed-0", "seed-100000"]
    weights = [(kept / s / "model.safetensors").read_bytes() for s in ("seed-0", "seed-100000")]
    assert weights[0] != weights[1] and (kept / "seed-0" / "train_report.json").is_file()


def test_a_model_failing_only_on_pope_gets_stage_three_redrawn_on_its_stage_two_model(tmp_path):
    from safetensors.torch import load_file

    from svp.world.build import SCALES, WorldGateError, ensure_world

    spec = SCALES["ci"]
    pope_only = dataclasses.replace(spec, attempts=1, stage_three_draws=2,
                                    gate=dataclasses.replace(spec.gate, min_pope_accuracy=1.01))
    with pytest.raises(WorldGateError, match=r"1 attempts \(seeds 0\)") as failed:
        ensure_world(tmp_path, scale=pope_only, progress=False)
    assert "seed 0 (gate): pope_accuracy_min" in str(failed.value)
    assert "seed 0, stage 3 redraw 1 (gate): pope_accuracy_min" in str(failed.value)
    base = tmp_path / f"{WORLD_VERSION}-ci"
    kept = base / "failed-attempts"
    assert sorted(p.name for p in kept.iterdir()) == ["seed-0", "seed-0-redraw-1"]
    assert not (base / "stage-2").exists()  # the stage-2 model lives only while a redraw may need it
    first, redrawn = (load_file(kept / name / "model.safetensors") for name in ("seed-0", "seed-0-redraw-1"))
    # stage 3 leaves the tower and trains the rest: the redraw shares the tower, not the decoder
    assert all(torch.equal(first[k], redrawn[k]) for k in first if "vision_tower" in k)
    assert not all(torch.equal(first[k], redrawn[k]) for k in first if "language_model" in k)
    report = json.loads((kept / "seed-0-redraw-1" / "train_report.json").read_text())
    assert report["stage_three_draw"] == 1
    assert report["probe_seconds"] > json.loads((kept / "seed-0" / "train_report.json").read_text())["probe_seconds"]
    # a failure that is not POPE's alone goes to the next seed with no redraw
    recall = dataclasses.replace(pope_only, gate=dataclasses.replace(pope_only.gate, min_recall=1.01))
    with pytest.raises(WorldGateError) as failed:
        ensure_world(tmp_path, scale=recall, progress=False)
    assert "redraw" not in str(failed.value)


def test_a_stage_three_redraw_starts_from_the_stage_two_model(tmp_path):
    from safetensors.torch import load_file

    from svp.world.model import redraw_stage_three

    config = dataclasses.replace(WorldModelConfig.ci(), probe_steps=0)
    report = train_world_vlm(tmp_path / "built", config, progress=False, stage_two_dir=tmp_path / "stage-2")
    # with no stage-3 steps, the build and a redraw are both the stage-2 model, bit for bit
    redrawn = redraw_stage_three(tmp_path / "stage-2", tmp_path / "redrawn", report,
                                 dataclasses.replace(config, probe_steps=0), draw=1, progress=False)
    built, again = (load_file(tmp_path / d / "model.safetensors") for d in ("built", "redrawn"))
    assert built.keys() == again.keys() and all(torch.equal(built[k], again[k]) for k in built)
    assert redrawn.stage_three_draw == 1 and (tmp_path / "redrawn" / "tokenizer.json").is_file()


def test_gate_refuses_a_model_that_names_one_shape_for_everything():
    from svp.world.gate import GateThresholds, gate_failures, gate_table, top_shape_share

    collapsed = ["In the image, at the top there is a large red triangle and a small blue triangle.",
                 "In the image, there is a green triangle.", "At the left there are two red circles."]
    # mentions: triangle x3, circle x2 (a count word asserts two)
    assert top_shape_share(collapsed) == pytest.approx(3 / 5)
    assert top_shape_share(collapsed[:2]) == 1.0 and top_shape_share(["In the image, at the image,"]) == 0.0
    thresholds = GateThresholds()
    sound = {"readout_shape": 0.97, "readout_colour": 0.999, "all_boxed": 0.92, "all_boxed_shapes_hidden": 0.7, "recall": 0.6,
             "hallucination": 0.1, "top_shape_share": 0.3, "pope_accuracy_min": 0.7,
             "pope_auc_min": 0.8}
    assert gate_failures(sound, thresholds) == []
    failures = gate_failures({**sound, "top_shape_share": 1.0, "readout_shape": 0.25}, thresholds)
    assert [f.split()[0] for f in failures] == ["readout_shape", "top_shape_share"]
    table = gate_table({**sound, "top_shape_share": 1.0}, thresholds)
    assert "top_shape_share" in table and "FAIL" in table and table.count("pass") == len(sound) - 2
    # POPE accuracy is gated (stage 3 teaches it); its margin's AUC is reported only
    assert gate_failures({**sound, "pope_accuracy_min": 0.5}, thresholds) == ["pope_accuracy_min 0.500 (needs >= 0.65)"]
    assert gate_failures({**sound, "pope_auc_min": 0.5}, thresholds) == [] and "(reported)" in table
    # a model that reads shapes but does not copy them from its grounding (seed 3's 0.397) is refused
    assert gate_failures({**sound, "all_boxed_shapes_hidden": 0.4}, thresholds) == [
        "all_boxed_shapes_hidden 0.400 (needs >= 0.5)"]


def test_training_inputs_are_what_inference_builds(vlm):
    encoder = PromptEncoder(vlm.processor)
    image = generate_scene("train", 0).render()
    assert encoder.prompt_ids(build_messages("base")) == vlm.prompt_inputs(image, "base").input_ids.tolist()
    ctx = "large red circle: [0.10, 0.20, 0.30, 0.40]"
    assert encoder.prompt_ids(build_messages("grounded", ctx)) == vlm.prompt_inputs(image, "grounded", ctx).input_ids.tolist()
    q = "Is there a red circle in the image? Answer the question using a single word or phrase."
    assert encoder.prompt_ids(question_messages(q)) == question_inputs(vlm, image, q).input_ids.tolist()
    assert torch.allclose(pixel_tensor([image], vlm.processor), vlm.prompt_inputs(image, "base").vision["pixel_values"],
                          atol=1e-5)
    assert vlm.tokenizer.unk_token_id not in encoder.prompt_ids(build_messages("grounded", ctx))


def test_length_chunks_minimise_padded_tokens_plus_pass_overhead():
    lengths = [150, 20, 140, 25, 30]
    # by hand: the three short rows pad to 30 (90 tokens), the two long ones to 150 (300), two passes of 50
    assert length_chunks(lengths, overhead=50) == [[1, 3, 4], [2, 0]]
    assert length_chunks(lengths, overhead=10**6) == [[1, 3, 4, 2, 0]]  # one pass: 5 x 150
    assert length_chunks(lengths, overhead=0) == [[1], [3], [4], [2], [0]]  # no padding at all
    # against every split of the sorted rows into contiguous passes
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(5, 200) for _ in range(rng.randint(1, 9))]
        overhead = rng.choice([0, 16, 96, 400])
        ordered = sorted(lengths)

        def cost(passes, overhead=overhead):
            return sum(len(p) * max(p) + overhead for p in passes)

        best = min(
            cost([ordered[a:b] for a, b in itertools.pairwise((0, *cuts, len(ordered)))])
            for k in range(len(ordered))
            for cuts in itertools.combinations(range(1, len(ordered)), k)
        )
        chunks = length_chunks(lengths, overhead)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
        assert cost([[lengths[i] for i in c] for c in chunks]) == best


@pytest.mark.parametrize("pass_overhead_tokens", [0, 96, 10**9])
def test_shared_prefix_loss_equals_plain_forward(vlm, pass_overhead_tokens):
    scenes = generate_scenes("train", 20)
    encoder = PromptEncoder(vlm.processor)
    config = dataclasses.replace(WorldModelConfig.ci(), obscured_boxed_ratio=1.0, probe_question_first=0.5)
    sampler = ExampleSampler(scenes, encoder, config)
    examples = [sampler.sample() for _ in range(40)]
    # the mix holds every prompt family, and some grounded examples come with an edited image
    assert any(not isinstance(e.image, int) for e in examples)
    # some probes put the question before the image (their own shared prefix)
    assert len({prefix_length(e.prompt, vlm.image_token_id) for e in examples}) > 3
    # ... yet they run in one group behind BOS; only the two system prompts get a group each
    assert len({shared_prefix(e.prompt, vlm.image_token_id) for e in examples}) == 3
    # probe answers carry their heavier token weight
    assert {e.weight for e in examples} >= {1.0, dict(WorldModelConfig.ci().token_weights)["pope"]}
    pixels = pixel_tensor([s.render() for s in scenes], vlm.processor)
    model = vlm.model
    width = max(len(e.prompt) + len(e.answer) for e in examples)
    ids = torch.full((len(examples), width), vlm.pad_token_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.prompt) + len(e.answer)
        ids[r, :n] = torch.tensor(e.prompt + e.answer)
        labels[r, len(e.prompt) : n] = torch.tensor(e.answer)
        attention[r, :n] = 1
    images = torch.stack([pixels[e.image] if isinstance(e.image, int) else e.image for e in examples])
    # the reference: a plain forward pass, each answer token's loss weighted by its task's weight
    plain_out = model(input_ids=ids, attention_mask=attention, pixel_values=images, output_hidden_states=True)
    logits = plain_out.logits
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="none").view(len(examples), -1)
    row_weights = torch.tensor([e.weight for e in examples])[:, None]
    plain = (token_losses * row_weights).sum() / (row_weights * (labels[:, 1:] != IGNORE_INDEX)).sum()
    total, weight_sum, states = answer_loss(model, examples, pixels, vlm.pad_token_id, vlm.image_token_id,
                                            state_layer=1, pass_overhead_tokens=pass_overhead_tokens)
    # the answer-position states, in the examples' order whatever group each ran in
    answer_positions = torch.tensor([len(e.prompt) - 1 for e in examples])
    assert states is not None
    assert torch.allclose(states, plain_out.hidden_states[1][torch.arange(len(examples)), answer_positions],
                          atol=1e-5)
    assert weight_sum == pytest.approx(float((row_weights * (labels != IGNORE_INDEX)).sum()))
    assert float((total / weight_sum).detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    weight = model.model.language_model.layers[0].self_attn.q_proj.weight
    g_plain = torch.autograd.grad(plain, weight)[0]
    g_shared = torch.autograd.grad(answer_loss(model, examples, pixels, vlm.pad_token_id, vlm.image_token_id,
                                               pass_overhead_tokens=pass_overhead_tokens)[0] / weight_sum, weight)[0]
    assert torch.allclose(g_plain, g_shared, atol=1e-6, rtol=1e-4)


def test_stage_three_trains_projector_and_decoder_on_captions_and_pope_and_leaves_the_tower(vlm):
    scenes = generate_scenes("train", 16)
    config = dataclasses.replace(WorldModelConfig.ci(), probe_steps=3, probe_captions=2, probe_questions=3,
                                 probe_counts=1, probe_base_share=0.5)
    sampler = ExampleSampler(scenes, PromptEncoder(vlm.processor), config)
    model = reinitialise_decoder(vlm.model, 7)  # a copy: the fixture's model stays as built
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    drawn: list = []
    sample_task = sampler.sample_task

    def record(task: str):
        drawn.append(task)
        return sample_task(task)

    sampler.sample_task = record  # type: ignore[method-assign]
    pope_loss = probe_tune(model, pixel_tensor([s.render() for s in scenes], vlm.processor), sampler,
                           vlm.pad_token_id, config, progress=False)
    assert 0 < pope_loss < 20
    # counting is kept beside POPE: without it every question came to be answered yes or no
    assert drawn.count("pope") == 9 and drawn.count("count") == 3 and len(drawn) == 18
    assert set(drawn) <= {"pope", "count", "base", "grounded"}
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert not any("vision_tower" in name for name in changed)
    assert any("multi_modal_projector" in name for name in changed)
    assert any("language_model.layers.3" in name or "language_model.layers.1" in name for name in changed)
    assert all(p.requires_grad for p in model.model.vision_tower.parameters())  # unfrozen again


def test_the_copy_phase_draws_grounded_examples_whose_boxed_shapes_only_the_context_names(vlm):
    scenes = generate_scenes("train", 50)
    encoder = PromptEncoder(vlm.processor)
    config = dataclasses.replace(WorldModelConfig.ci(), obscured_boxed_ratio=0.0)
    sampler = ExampleSampler(scenes, encoder, config)
    sampler.copying = True
    examples = [sampler.sample() for _ in range(60)]
    for e in examples:
        assert e.answer == encoder.answer_ids(canonical_caption(scenes[e.scene].objects))  # a grounded answer
    edited = [e for e in examples if not isinstance(e.image, int)]
    # every example with a box shows its boxed objects shape-free (only the few with no box keep the scene)
    assert len(edited) > 0.7 * len(examples)
    for e in edited[:5]:
        scene = scenes[e.scene]
        redrawn = [pixel_tensor(obscure_shapes(scene, boxed, shape_free=True)[None], vlm.processor)[0]
                   for boxed in _subsets(scene.objects)]
        assert any(torch.equal(e.image, r) for r in redrawn)
    sampler.copying = False
    assert {type(sampler.sample().image) for _ in range(40)} >= {int}  # the mix again


def test_stage_two_checks_for_a_stall_then_runs_the_copy_phase_then_the_rest_of_the_mix(vlm, monkeypatch):
    import svp.world.model as world_model

    scenes = generate_scenes("train", 16)
    config = dataclasses.replace(WorldModelConfig.ci(), steps=6, copy_from=2, copy_steps=3, stall_check_step=2,
                                 stall_loss_ratio=10.0, batch_size=1, simple_scene_steps=0)
    sampler = ExampleSampler(scenes, PromptEncoder(vlm.processor), config)
    events: list = []
    sample = sampler.sample
    attribute_losses_ = world_model.attribute_losses

    def record_sample(weighted: bool = True):
        events.append(("copy" if sampler.copying else "mix", sampler.step))
        return sample(weighted)

    def record_check(*args):
        events.append(("stall check", sampler.step))
        return attribute_losses_(*args)

    sampler.sample = record_sample  # type: ignore[method-assign]
    monkeypatch.setattr(world_model, "attribute_losses", record_check)
    instruction_tune(reinitialise_decoder(vlm.model, 3), pixel_tensor([s.render() for s in scenes], vlm.processor),
                     sampler, vlm.pad_token_id, config, progress=False)
    # mix steps 0-1, the check once the decoder has trained stall_check_step steps, 3 copy steps, mix 2-5
    assert events == [("mix", 0), ("mix", 1), ("stall check", 1), ("copy", 2), ("copy", 2), ("copy", 2),
                      ("mix", 2), ("mix", 3), ("mix", 4), ("mix", 5)]


def _subsets(objects):
    import itertools

    return [list(c) for k in range(1, len(objects) + 1) for c in itertools.combinations(objects, k)]


def test_early_stage_two_draws_simple_scenes_and_asks_some_captions_without_system_prompt(vlm):
    scenes = generate_scenes("train", 200)
    encoder = PromptEncoder(vlm.processor)
    config = dataclasses.replace(WorldModelConfig.ci(), obscured_boxed_ratio=0.0, simple_scene_steps=100,
                                 simple_scene_objects=2, bare_caption_share=0.5, bare_grounded_share=0.5,
                                 task_weights=(("base", 0.5), ("grounded", 0.3), ("reg", 0.2)))
    sampler = ExampleSampler(scenes, encoder, config)
    system_prompted = encoder.prompt_ids(build_messages("base"))
    bare = encoder.prompt_ids(question_messages(PAPER_PROMPTS.base))

    def draw(step: int, n: int = 300) -> list:
        sampler.step = step
        return [sampler.sample() for _ in range(n)]

    early = draw(99)
    assert max(len(scenes[e.image].objects) for e in early) <= 2
    base_prompts = [e.prompt for e in early if e.prompt in (system_prompted, bare)]
    assert 0.35 < sum(p == bare for p in base_prompts) / len(base_prompts) < 0.65
    assert prefix_length(bare, vlm.image_token_id) < prefix_length(system_prompted, vlm.image_token_id) / 10
    # grounded captions too: half behind the grounded system prompt, half the same user turn alone
    grounded_system = encoder.prompt_ids(build_messages("grounded"))
    system_length = prefix_length(grounded_system, vlm.image_token_id)
    context_id = vlm.tokenizer.convert_tokens_to_ids("context")
    grounded = [e.prompt for e in early if context_id in e.prompt[prefix_length(e.prompt, vlm.image_token_id):]]
    bare_grounded = [p for p in grounded if prefix_length(p, vlm.image_token_id) == prefix_length(bare, vlm.image_token_id)]
    assert all(p[:system_length] == grounded_system[:system_length] for p in grounded if p not in bare_grounded)
    assert 0.35 < len(bare_grounded) / len(grounded) < 0.65
    assert all(p[:prefix_length(p, vlm.image_token_id)] == bare[:prefix_length(bare, vlm.image_token_id)]
               for p in bare_grounded)
    assert max(len(scenes[e.image].objects) for e in draw(100)) > 2  # then every scene


def test_attribute_losses_match_an_independent_teacher_forced_pass(vlm):
    import math

    from svp.world.language import canonical_caption
    from svp.world.model import ATTRIBUTE_WORDS

    scenes = generate_scenes("train", 3, start=500)
    got = attribute_losses(vlm.model, PromptEncoder(vlm.processor), scenes)
    tok = vlm.tokenizer
    expected: dict[str, list[float]] = {"shape": [], "colour": []}
    for scene in scenes:
        inputs = vlm.prompt_inputs(scene.render(), "base")  # the inference path's tokens and pixels
        words = canonical_caption(scene.objects).replace(".", " .").replace(",", " ,").split()
        answer = [tok.convert_tokens_to_ids(w) for w in words] + [tok.eos_token_id]
        ids = torch.tensor([inputs.input_ids.tolist() + answer])
        with torch.no_grad():
            logp = torch.log_softmax(vlm.model(input_ids=ids, **inputs.vision).logits[0].double(), -1)
        for k, word in enumerate(words):
            for name, vocabulary in ATTRIBUTE_WORDS.items():
                if word in vocabulary:
                    at = len(inputs.input_ids) + k - 1  # the position that predicts word k
                    ids_of_class = [tok.convert_tokens_to_ids(w) for w in vocabulary]
                    expected[name].append(-(float(logp[at, answer[k]]) - math.log(sum(
                        math.exp(float(logp[at, i])) for i in ids_of_class))))
    assert set(got) == set(expected)
    for name in expected:
        assert got[name] == pytest.approx(sum(expected[name]) / len(expected[name]), rel=1e-4)


def test_a_decoder_that_stalls_restarts_on_the_same_tower_then_gives_up(tmp_path):
    strict = dataclasses.replace(WorldModelConfig.ci(), stall_check_step=5, stall_loss_ratio=0.01,
                                 max_decoder_restarts=1)
    with pytest.raises(DecoderStalled, match="blind to the image"):
        train_world_vlm(tmp_path / "strict", strict, progress=False)
    lenient = dataclasses.replace(strict, stall_loss_ratio=10.0)
    report = train_world_vlm(tmp_path / "lenient", lenient, progress=False)
    assert report.decoder_restarts == [] and report.steps == lenient.copy_steps + lenient.steps
    model = load_vlm(tmp_path / "lenient").model
    fresh = reinitialise_decoder(model, seed=1000)
    tower, fresh_tower = model.model.vision_tower.state_dict(), fresh.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], fresh_tower[k]) for k in tower)
    decoder = model.model.language_model.state_dict()
    assert not torch.equal(decoder["layers.0.self_attn.q_proj.weight"],
                           fresh.model.language_model.state_dict()["layers.0.self_attn.q_proj.weight"])
    again = reinitialise_decoder(model, seed=1000)  # a restart is a function of its seed
    assert torch.equal(again.model.multi_modal_projector.linear_1.weight, fresh.model.multi_modal_projector.linear_1.weight)


def test_training_groundings_are_true():
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = set()
    for scene in generate_scenes("train", 50):
        grounding = training_grounding(scene, rng, full_share=0.45)
        sizes.add(len(grounding) / len(scene.objects))
        for obj, box in grounding:
            assert obj in scene.objects
            assert box.label in (obj.phrase, obj.kind)
            assert all(abs(a - b) <= 0.02 + 1e-9 for a, b in zip(box.xyxy, obj.box, strict=True))
    assert 0.0 in sizes and 1.0 in sizes and len(sizes) > 2  # empty, complete and partial groundings


def test_base_captions_of_busy_scenes_leave_out_small_objects(vlm):
    scenes = generate_scenes("train", 60)
    config = dataclasses.replace(WorldModelConfig.ci(), omit_small_in_busy=1.0)
    sampler = ExampleSampler(scenes, PromptEncoder(vlm.processor), config)
    omitted = 0
    for scene in scenes:
        kept = sampler.base_caption_objects(scene)
        assert kept and all(o in scene.objects for o in kept)  # never empty, never invented
        if len(scene.objects) < config.busy_scene_objects:
            assert kept == list(scene.objects)
        elif any(o.size == "large" for o in scene.objects):
            assert kept == [o for o in scene.objects if o.size == "large"]
        omitted += len(scene.objects) - len(kept)
    assert omitted > 0
    # at 0 every caption is complete
    complete = ExampleSampler(scenes, PromptEncoder(vlm.processor),
                              dataclasses.replace(config, omit_small_in_busy=0.0))
    assert all(complete.base_caption_objects(s) == list(s.objects) for s in scenes)


def test_presence_targets_are_the_kinds_of_each_scene():
    from svp.world.scenes import COLOURS, SHAPES

    scenes = generate_scenes("train", 30)
    present = kinds_present(cell_targets(scenes))
    kinds = [f"{c} {s}" for s in SHAPES for c in COLOURS]  # shape-major, as the cell targets' indices
    for scene, row in zip(scenes, present, strict=True):
        assert {kinds[i] for i in row.nonzero().flatten().tolist()} == {o.kind for o in scene.objects}
    assert set(present.unique().tolist()) == {0.0, 1.0}
    assert [kind_class(k) for k in kinds] == list(range(len(kinds)))


def test_answer_probes_loss_is_scene_kinds_for_all_and_asked_kind_for_pope(vlm):
    scenes = generate_scenes("train", 12)
    sampler = ExampleSampler(scenes, PromptEncoder(vlm.processor), WorldModelConfig.ci())
    examples = [sampler.sample() for _ in range(40)]
    pope = [e for e in examples if e.asked_kind is not None]
    assert pope and len(pope) < len(examples)
    # a POPE example's asked kind is the kind its question names
    by_id = {s.scene_id: n for n, s in enumerate(scenes)}
    questions = {(by_id[q.scene_id], q.question): q.kind for st in ("random", "popular", "adversarial")
                 for q in sampler.pope[st]}
    decode = vlm.tokenizer.decode
    for e in pope:
        question = next(q for (n, q) in questions if n == e.scene and q.split("?")[0] in decode(e.prompt))
        assert e.asked_kind == kind_class(questions[(e.scene, question)])
    torch.manual_seed(0)
    probes = AnswerProbes(16)
    states = torch.randn(len(examples), 16)
    presence = kinds_present(cell_targets(scenes))
    # by hand: mean binary cross-entropy over every example's 24 kinds, x5, plus the POPE rows' softmax loss
    p_scene = torch.sigmoid(probes.scene_kinds(states))
    target = presence[[e.scene for e in examples]]
    bce = -(target * p_scene.log() + (1 - target) * (1 - p_scene).log()).mean()
    rows = [n for n, e in enumerate(examples) if e.asked_kind is not None]
    log_p = probes.asked_kind(states[rows]).log_softmax(-1)
    ce = -torch.stack([log_p[r, examples[n].asked_kind] for r, n in enumerate(rows)]).mean()
    expected = 5.0 * bce + ce
    assert float(probes.loss(states, examples, presence).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_obscured_objects_keep_their_place_and_lose_their_outline():
    import numpy as np
    from PIL import Image

    from svp.world.detector import ShapesDetector

    detector = ShapesDetector()
    found = shapes_right = 0
    n = 0
    for scene in generate_scenes("train", 40):
        if len(scene.objects) < 2:
            continue
        obscured, kept = scene.objects[0], scene.objects[1:]
        pixels = obscure_shapes(scene, [obscured])
        clean = np.asarray(scene.render())
        for o in kept:  # untouched objects are pixel-identical
            x0, y0 = o.origin
            assert np.array_equal(pixels[y0 : y0 + o.side, x0 : x0 + o.side], clean[y0 : y0 + o.side, x0 : x0 + o.side])
        cx, cy = (obscured.box[0] + obscured.box[2]) / 2, (obscured.box[1] + obscured.box[3]) / 2
        hits = [d for d in detector.detect_objects(Image.fromarray(pixels))
                if d.xyxy[0] <= cx <= d.xyxy[2] and d.xyxy[1] <= cy <= d.xyxy[3]]
        n += 1
        found += bool(hits)
        shapes_right += bool(hits) and hits[0].shape == obscured.shape
    assert n >= 15 and found == n  # still there, in its place
    assert shapes_right / n <= 0.5  # the outline no longer tells the shape (the clean detector gets 100 %)


def test_shape_free_obscuring_leaves_nothing_of_the_shape():
    import numpy as np

    for scene in generate_scenes("train", 10):
        hidden = scene.objects[0]
        for shape in SHAPES:  # the same scene (same noise) with the hidden object's shape changed
            variant = dataclasses.replace(scene, objects=(dataclasses.replace(hidden, shape=shape), *scene.objects[1:]))
            assert np.array_equal(obscure_shapes(variant, [variant.objects[0]], shape_free=True),
                                  obscure_shapes(scene, [hidden], shape_free=True))
        # a blurred outline alone still differs with the shape
        other = next(s for s in SHAPES if s != hidden.shape)
        variant = dataclasses.replace(scene, objects=(dataclasses.replace(hidden, shape=other), *scene.objects[1:]))
        assert not np.array_equal(obscure_shapes(variant, [variant.objects[0]]), obscure_shapes(scene, [hidden]))


def test_vision_path_stays_float32_under_bfloat16_autocast(vlm):
    model = vlm.model
    pixels = torch.randn(2, 3, 96, 96)

    def features() -> torch.Tensor:
        out = model.model.get_image_features(pixel_values=pixels)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.cat(list(out)) if isinstance(out, (list, tuple)) else out

    reference = features()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with vision_in_float32(model):
            kept = features()
        rounded = features()
    assert kept.dtype == torch.float32 and torch.equal(kept, reference)
    assert rounded.dtype == torch.bfloat16  # the class's own forward is back after the block
    assert "forward" not in vars(model.model.vision_tower)


@pytest.mark.parametrize("native", [True, False])
def test_forcing_bfloat16_warns_only_where_the_cpu_would_emulate_it(monkeypatch, native):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    forced = WorldModelConfig.ci()
    forced = dataclasses.replace(forced, bf16=True)
    message = bf16_emulation_warning(forced)
    assert (message is None) == native
    if message:
        assert "emulated" in message and "float32" in message
    # float32, the default, is never slow: no warning on any CPU
    assert bf16_emulation_warning(dataclasses.replace(forced, bf16=False)) is None


def test_evaluation_suite_and_premise_run_on_the_model(vlm):
    results, texts = evaluate_world(vlm, n_scenes=3, options=FAST)
    assert set(results) == {"captioning", "objects", "grounded_all_boxed", "pope_random", "pope_popular",
                            "pope_adversarial", "reg", "counting"}
    for group in results.values():
        for value in group.values():
            assert value >= 0.0
    assert 0.0 <= results["objects"]["object_recall"] <= 1.0
    assert all(0.0 <= results[f"pope_{s}"]["yes_margin_auc"] <= 1.0 for s in ("random", "popular", "adversarial"))
    assert len(texts["caption"]) == 3
    assert set(results["grounded_all_boxed"]) == {"boxed_object_accuracy", "hallucination_rate", "shapes_hidden_accuracy"}
    assert len(texts["grounded_shapes_hidden"]) == 3
    premise = premise_check(vlm, n_scenes=2, k=2, options=FAST)
    assert premise["grounding"]["samples"] == 4.0
    assert set(premise["prior"]) == set(premise["grounded"])


def test_yes_no_margins_equal_a_plain_forward_of_each_question(vlm):
    """The batched (left-padded) margins against one unpadded forward per question, by hand."""
    scenes = generate_scenes("test", 3)
    items = [(s, q) for s in scenes for q in ("Is there a red circle in the image?", "Is there an orange star here?")]
    prompts = [question_inputs(vlm, s.render(), q) for s, q in items]
    margins = yes_no_margins(vlm, prompts, batch_size=4, progress=False)
    yes = [vlm.tokenizer.convert_tokens_to_ids(w) for w in ("Yes", "yes")]
    no = [vlm.tokenizer.convert_tokens_to_ids(w) for w in ("No", "no")]
    assert first_token_ids(vlm, ("Yes", "yes")) == sorted(yes)
    for prompt, margin in zip(prompts, margins, strict=True):
        with torch.no_grad():
            logits = vlm.model(input_ids=prompt.input_ids[None], **prompt.vision).logits[0, -1].float()
        p = logits.softmax(-1)
        assert margin == pytest.approx(float(torch.log(p[yes].sum()) - torch.log(p[no].sum())), abs=1e-4)


def test_cli_eval_and_export(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", str(world.model_dir), "--n", "2", "--tasks", "pope,count", "--no-meteor",
                              "--batch-size", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert set(payload["results"]) == {"pope_random", "pope_popular", "pope_adversarial", "counting"}
    assert "pope_random" in res.output
    res = runner.invoke(app, ["eval", str(world.model_dir), "--n", "2", "--tasks", "nonsense"])
    assert res.exit_code != 0
    res = runner.invoke(app, ["world", "export", "test", "3", str(tmp_path / "exp")])
    assert res.exit_code == 0 and (tmp_path / "exp" / "manifest.txt").is_file()
    res = runner.invoke(app, ["world", "export", "validation", "3", str(tmp_path / "bad")])
    assert res.exit_code != 0


def test_cli_build_reuses_the_cached_model_and_prints_its_gate(world):
    before = (world.model_dir / "model.safetensors").stat().st_mtime_ns
    res = CliRunner().invoke(app, ["world", "build", "--root", str(world.root.parent), "--scale", "ci"])
    assert res.exit_code == 0, res.output
    assert (world.model_dir / "model.safetensors").stat().st_mtime_ns == before  # reused, not rebuilt
    heading = f"ShapesWorld gate of the cached model (seed {world.build['seed']}"
    assert heading in res.output and "pope_accuracy_min" in res.output
    assert json.loads(res.output[res.output.index("{"):])["model"] == str(world.model_dir)


def test_real_data_path_scores_a_coco_reference_file(world, vlm):
    test_dir = world.data_dirs["test"]
    results, texts = evaluate_coco(vlm, test_dir / "captions_coco.json", test_dir, n_images=2,
                                   instances_file=test_dir / "instances_coco.json", options=FAST)
    assert set(results) == {"captioning", "objects"} and len(texts["caption"]) == 2
    assert 0.0 <= results["objects"]["hallucination_rate"] <= 1.0


def test_learning_rate_warms_up_then_follows_a_cosine_down_to_its_floor():
    assert [lr_factor(0.0, step, warmup_steps=4) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(0.0, 4, warmup_steps=4) == 1.0
    assert lr_factor(0.5, 100, warmup_steps=4, floor=0.0) == pytest.approx(0.5)
    assert lr_factor(0.5, 100, warmup_steps=4, floor=0.1) == pytest.approx(0.55)
    assert lr_factor(1.0, 200, warmup_steps=4, floor=0.0) == pytest.approx(0.0)
    assert lr_factor(1.0, 200, warmup_steps=4) == pytest.approx(0.1)  # stage 1's floor
