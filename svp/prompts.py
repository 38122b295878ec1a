"""Prompts of the paper (Appendix F) as versioned data, and the chat formats they are applied in.

A prompt set is data with a name and a version so a run records exactly what it used. The chat
formats are the conversation templates of the paper's ``prompt-version`` row (Table 11):
``llava_v1`` (Vicuna, LLaVA-1.5 / 1.6-13B), ``mistral_instruct`` (LLaVA-1.6-7B) and
``qwen_1_5`` (ChatML, LLaVA-OneVision). Real checkpoints bring their own template through their
processor; the templates here are installed on the models this project builds itself, written
in the same Jinja dialect that ``apply_chat_template`` renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from svp.contract import PromptKind, PromptRecord


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: str
    system_sampling: str
    system_grounded: str
    base: str
    grounded: str  # format string with one field: {grounding}

    def system(self, kind: PromptKind) -> str:
        return self.system_grounded if kind == "grounded" else self.system_sampling

    def user_text(self, kind: PromptKind, context: str = "") -> str:
        if kind == "base":
            return self.base
        return self.grounded.format(grounding=context)


_SYSTEM_HEAD = (
    "You are an AI visual-language assistant that can analyze images and helps writing detailed "
    "descriptions of images."
)
_DESCRIBE = (
    "Describe the scene and the objects in the image in details. Describe the object attributes and "
    "positions. Output only the descriptions of objects that are in the image. Use separate sentence "
    "for each object."
)
_BASE = "Please generate a detailed and comprehensive description for the content of this image. Be precise."

PAPER_PROMPTS = PromptSet(
    name="svp-appendix-f",
    version="1",
    system_sampling=(
        f"{_SYSTEM_HEAD}\n<instruction>\n{_DESCRIBE}\n"
        "Include details like object counts, position of the objects, relative position between the "
        'objects. Start your description with "In the image, ".\n</instruction>'
    ),
    system_grounded=(
        f"{_SYSTEM_HEAD}\nIn addition, specific objects and object locations within the image are given, "
        "along with detailed coordinates inside <context></context>. These coordinates are in the form of "
        "bounding boxes, represented as (x1, y1, x2, y2) with floating numbers ranging from 0 to 1. These "
        "values correspond to the top left x, top left y, bottom right x, and bottom right y. <instruction>\n"
        "Using the provided objects and bounding boxes inside <context></context>, describe the image.\n"
        f"{_DESCRIBE}\n"
        "Include details like object counts, position of the objects, relative position between the "
        "objects. *Do not mention the bounding box coordinates. Utilize this data to explain the scene "
        'using natural language.*\nStart your description with "In the image, ". </instruction>'
    ),
    base=_BASE,
    grounded="<context> {grounding} </context> " + _BASE,
)

PROMPT_SETS: dict[str, PromptSet] = {PAPER_PROMPTS.name: PAPER_PROMPTS}


def build_messages(
    kind: PromptKind,
    context: str = "",
    prompts: PromptSet = PAPER_PROMPTS,
    answer: str | None = None,
) -> list[dict[str, Any]]:
    """Messages in transformers' multimodal chat format: system, user (image + text), optional answer."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": prompts.system(kind)}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prompts.user_text(kind, context)}],
        },
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def prompt_record(chat_format: str, prompts: PromptSet = PAPER_PROMPTS) -> PromptRecord:
    return PromptRecord(name=prompts.name, version=prompts.version, chat_format=chat_format)


# The macro renders a message's content whether it is a plain string or a list of typed parts;
# an image part becomes the model's image placeholder followed by a newline (LLaVA convention).
_CONTENT_MACRO = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}<image>{{ '\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

CHAT_TEMPLATES: dict[str, str] = {
    # LLaVA's conv_vicuna_v1: "<system> USER: <image>\\n<prompt> ASSISTANT: <answer></s>"
    "llava_v1": _CONTENT_MACRO
    + "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ render(m['content']) }}{{ ' ' }}"
    "{%- elif m['role'] == 'user' -%}USER: {{ render(m['content']) }}{{ ' ' }}"
    "{%- elif m['role'] == 'assistant' -%}ASSISTANT: {{ render(m['content']) }}{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}",
    # LLaVA's conv_mistral_instruct: no system role, so the system text leads the first user turn.
    "mistral_instruct": _CONTENT_MACRO
    + "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = render(m['content']) + '\\n\\n' -%}"
    "{%- elif m['role'] == 'user' -%}[INST] {{ ns.system }}{{ render(m['content']) }} [/INST]"
    "{%- set ns.system = '' -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' }}{{ render(m['content']) }}{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}",
    # LLaVA-OneVision's qwen_1_5 (ChatML).
    "qwen_1_5": _CONTENT_MACRO
    + "{%- for m in messages -%}"
    "<|im_start|>{{ m['role'] }}{{ '\\n' }}{{ render(m['content']) }}<|im_end|>{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}",
}
