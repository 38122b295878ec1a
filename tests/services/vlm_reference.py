"""An independent teacher-forcing reference for the sampler and scorer tests.

It uses transformers directly (``AutoModelForImageTextToText``, ``AutoProcessor``, peft), not
:mod:`svp.models`: one unpadded forward pass per continuation, full-vocabulary log-softmax.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from svp.contract import Box, PromptKind
from svp.grounding import render_context
from svp.prompts import build_messages


class ReferenceVLM:
    def __init__(self, model_dir: Path, adapter_dir: Path | None = None):
        self.processor = AutoProcessor.from_pretrained(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        self.model = model.eval()

    def logprobs(self, image: Image.Image, kind: PromptKind, boxes: list[Box], continuation: list[int]) -> torch.Tensor:
        """``[len(continuation), vocab]``: log-softmax predicting each continuation token after the prompt."""
        text = self.processor.apply_chat_template(
            build_messages(kind, render_context(boxes)), add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(images=image, text=text, return_tensors="pt")
        prompt_len = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([continuation])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            logits = self.model(**inputs).logits[0, prompt_len - 1 : prompt_len - 1 + len(continuation)]
        return torch.log_softmax(logits.double(), dim=-1)
