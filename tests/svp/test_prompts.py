from jinja2.sandbox import ImmutableSandboxedEnvironment

from svp.prompts import CHAT_TEMPLATES, PAPER_PROMPTS, build_messages, prompt_record

BASE = "Please generate a detailed and comprehensive description for the content of this image. Be precise."


def _render(fmt, messages, gen):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATES[fmt]).render(messages=messages, add_generation_prompt=gen, eos_token="</s>")


def test_paper_wording():
    assert PAPER_PROMPTS.base == BASE
    assert PAPER_PROMPTS.user_text("grounded", "x: [0.00, 0.00, 1.00, 1.00]") == (
        f"<context> x: [0.00, 0.00, 1.00, 1.00] </context> {BASE}"
    )
    assert PAPER_PROMPTS.system_sampling.startswith("You are an AI visual-language assistant")
    assert 'Start your description with "In the image, "' in PAPER_PROMPTS.system_sampling
    assert "(x1, y1, x2, y2) with floating numbers ranging from 0 to 1" in PAPER_PROMPTS.system_grounded
    assert "*Do not mention the bounding box coordinates." in PAPER_PROMPTS.system_grounded
    assert prompt_record("llava_v1").model_dump() == {
        "name": "svp-appendix-f", "version": "1", "chat_format": "llava_v1"
    }


def test_chat_formats_by_hand():
    m = build_messages("base")
    m[0]["content"][0]["text"] = "SYS"
    assert _render("llava_v1", m, True) == f"SYS USER: <image>\n{BASE} ASSISTANT:"
    assert _render("mistral_instruct", m, True) == f"[INST] SYS\n\n<image>\n{BASE} [/INST]"
    assert _render("qwen_1_5", m, True) == (
        f"<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<image>\n{BASE}<|im_end|>\n<|im_start|>assistant\n"
    )
    a = build_messages("grounded", "c: [0.10, 0.20, 0.30, 0.40]", answer="In the image, x.")
    a[0]["content"][0]["text"] = "SYS"
    ctx = f"<context> c: [0.10, 0.20, 0.30, 0.40] </context> {BASE}"
    assert _render("llava_v1", a, False) == f"SYS USER: <image>\n{ctx} ASSISTANT: In the image, x.</s>"
    assert _render("mistral_instruct", a, False) == f"[INST] SYS\n\n<image>\n{ctx} [/INST] In the image, x.</s>"


def test_generation_prompt_is_a_prefix_of_the_full_conversation():
    for fmt in CHAT_TEMPLATES:
        prompt = _render(fmt, build_messages("base"), True)
        full = _render(fmt, build_messages("base", answer="In the image, a red circle."), False)
        assert full.startswith(prompt), fmt
