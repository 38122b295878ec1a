"""Tiny VLMs built, saved and loaded like real checkpoints; prompts rendered and tokenised through them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from svp.contract import Box
from svp.grounding import render_context
from svp.models.loading import AdapterNotFoundError, ModelNotFoundError, load_vlm
from svp.models.tiny import build_tiny_vlm
from svp.models.tokenizer import IMAGE, build_word_tokenizer, default_vocabulary
from svp.prompts import PAPER_PROMPTS

pytestmark = pytest.mark.usefixtures("single_torch_thread")
P = PAPER_PROMPTS
CONTEXT = render_context([Box(label="red circle", xyxy=(0.1, 0.2, 0.3, 0.4))])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny")
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, chat_format: str = "llava_v1") -> Path:
        if (arch, chat_format) not in built:
            built[arch, chat_format] = build_tiny_vlm(root / f"{arch}-{chat_format}", arch, chat_format, seed=0)
        return built[arch, chat_format]

    return get


def test_tokenizer_round_trips_captions_and_keeps_special_tokens_whole():
    tok = build_word_tokenizer(default_vocabulary(), "qwen_1_5")
    text = "In the image, there is a red circle."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    pieces = tok.convert_ids_to_tokens(tok(f"{IMAGE}{IMAGE}\nPlease<|im_start|>", add_special_tokens=False).input_ids)
    assert pieces == [IMAGE, IMAGE, "Please", "<|im_start|>"]
    # Ids are stable: special tokens first, then words in first-seen order.
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>", IMAGE]) == [0, 1, 2, 3, 4]
    assert tok.convert_tokens_to_ids("zebra-crossing") == tok.unk_token_id
    with pytest.raises(ValueError, match="unknown chat format"):
        build_word_tokenizer(["a"], "nope")


EXPECTED_PROMPTS = {
    "llava_v1": f"{P.system_sampling} USER: {IMAGE}\n{P.base} ASSISTANT:",
    "mistral_instruct": f"[INST] {P.system_sampling}\n\n{IMAGE}\n{P.base} [/INST]",
    "qwen_1_5": (
        f"<|im_start|>system\n{P.system_sampling}<|im_end|>\n<|im_start|>user\n{IMAGE}\n{P.base}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("chat_format", list(EXPECTED_PROMPTS))
def test_llava_renders_each_chat_format_and_expands_the_image(model_dir, chat_format):
    vlm = load_vlm(model_dir("llava", chat_format))
    assert vlm.chat_format == chat_format
    assert vlm.render_prompt("base") == EXPECTED_PROMPTS[chat_format]
    grounded = vlm.render_prompt("grounded", CONTEXT)
    assert P.system_grounded in grounded and f"<context> {CONTEXT} </context> {P.base}" in grounded

    inputs = vlm.prompt_inputs(Image.new("RGB", (48, 40), "red"), "base")
    ids = inputs.input_ids.tolist()
    # (32 / 8)^2 patches; CLIP's CLS token is dropped by the "default" feature strategy.
    assert ids.count(vlm.image_token_id) == 16
    assert ids[0] == vlm.tokenizer.bos_token_id and ids.count(vlm.tokenizer.bos_token_id) == 1
    first = ids.index(vlm.image_token_id)
    assert ids[first : first + 16] == [vlm.image_token_id] * 16
    text_ids = [i for i in ids if i != vlm.image_token_id]
    assert vlm.tokenizer.unk_token_id not in text_ids
    assert inputs.vision["pixel_values"].shape == (1, 3, 32, 32)


def test_llava_next_expands_the_image_into_tiles(model_dir):
    vlm = load_vlm(model_dir("llava_next"))
    assert vlm.render_prompt("base") == EXPECTED_PROMPTS["llava_v1"]
    inputs = vlm.prompt_inputs(Image.new("RGB", (64, 64), "blue"), "base")
    # A 64x64 image picks the [64, 64] canvas: 2x2 tiles of 4x4 patches = an 8x8 grid, one newline
    # token per grid row (nothing to unpad, same aspect ratio), plus the 4x4 base image.
    assert inputs.input_ids.tolist().count(vlm.image_token_id) == 8 * 8 + 8 + 16
    assert inputs.vision["pixel_values"].shape == (1, 5, 3, 32, 32)
    assert inputs.vision["image_sizes"].tolist() == [[64, 64]]


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_teacher_forced_rows_give_the_logprobs_of_each_row_alone(model_dir, arch):
    vlm = load_vlm(model_dir(arch))
    base = vlm.prompt_inputs(Image.new("RGB", (40, 30), "red"), "base")
    grounded = vlm.prompt_inputs(Image.new("RGB", (30, 70), "blue"), "grounded", CONTEXT)
    # Prompts of different lengths (and LLaVA-NeXT tile counts) left-padded; continuations right-padded.
    batch = vlm.collate([base, grounded, base], [[10, 11, 12], [13], []])
    assert batch.suffix_mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert batch.prompt_end == max(len(base), len(grounded))

    rows, continuations = [0, 1, 0], [[10, 11, 12], [13], [14, 15]]
    logprobs, ids, mask = vlm.continuation_logprobs([base, grounded], rows, continuations)
    assert logprobs.shape == (3, 3, vlm.vocab_size)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]] and ids[0].tolist() == [10, 11, 12]
    with torch.no_grad():
        for r, cont in enumerate(continuations):
            prompt = [base, grounded][rows[r]]
            full = torch.cat([prompt.input_ids, torch.tensor(cont)])[None]
            logits = vlm.model(input_ids=full, **prompt.vision).logits[0]
            alone = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(cont)], -1)
            torch.testing.assert_close(logprobs[r, : len(cont)], alone, atol=1e-5, rtol=0)


def test_a_template_without_a_system_role_gets_the_system_text_in_the_user_turn(model_dir, tmp_path):
    from transformers import AutoProcessor

    src = model_dir("llava")
    processor = AutoProcessor.from_pretrained(src)
    processor.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ raise_exception('no system role') }}"
        "{%- endif -%}{{ m['role'] }}: {%- for p in m['content'] -%}{%- if p['type'] == 'image' -%}<image>"
        "{%- else -%}{{ p['text'] }}{%- endif -%}{%- endfor -%};{%- endfor -%}"
    )
    dst = tmp_path / "nosystem"
    processor.save_pretrained(dst)
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    vlm = load_vlm(dst)
    assert vlm.chat_format == "checkpoint"
    assert vlm.render_prompt("base") == f"user:<image>{P.system_sampling}\n\n{P.base};"


def test_adapters_load_by_name_and_switch(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    path = model_dir("llava")
    vlm = load_vlm(path)
    with pytest.raises(AdapterNotFoundError, match="'missing'"):
        vlm.load_adapter("missing", tmp_path)
    with pytest.raises(AdapterNotFoundError, match="not a valid adapter name"):
        vlm.load_adapter("../escape", tmp_path)

    peft_model = get_peft_model(load_vlm(path).model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    peft_model.save_pretrained(tmp_path / "adapters" / "x")

    prompt = vlm.prompt_inputs(Image.new("RGB", (32, 32), "green"), "base")
    def logprobs() -> torch.Tensor:
        return vlm.continuation_logprobs([prompt], [0], [[10, 11]])[0]

    before = logprobs()
    assert vlm.load_adapter("x", tmp_path) == (tmp_path / "adapters" / "x").resolve()
    with vlm.use_adapter("x"):
        adapted = logprobs()
    with vlm.use_adapter(None):
        plain = logprobs()
    assert (adapted - before).abs().max() > 1e-3
    torch.testing.assert_close(plain, before)
    with pytest.raises(AdapterNotFoundError, match="'other'"), vlm.use_adapter("other"):
        pass


def test_full_feature_strategy_gives_the_decoder_the_cls_token_too(tmp_path):
    vlm = load_vlm(build_tiny_vlm(tmp_path / "full", "llava", seed=0, vision_feature_select_strategy="full"))
    inputs = vlm.prompt_inputs(Image.new("RGB", (48, 40), "red"), "base")
    assert inputs.input_ids.tolist().count(vlm.image_token_id) == 16 + 1
    # transformers checks that the image features fill exactly the prompt's image tokens
    out = vlm.model.generate(input_ids=inputs.input_ids[None], **inputs.vision, max_new_tokens=3, do_sample=False,
                             min_new_tokens=3)
    assert out.shape[1] == len(inputs) + 3
    with pytest.raises(ValueError, match="'default' or 'full'"):
        build_tiny_vlm(tmp_path / "bad", "llava", vision_feature_select_strategy="cls")


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        load_vlm(tmp_path / "nowhere")
