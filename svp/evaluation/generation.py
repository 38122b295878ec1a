"""Batched generation for evaluation: any prompt (SVP caption prompts or probe questions) through a
:class:`svp.models.loading.LoadedVLM`, with transformers' ``generate`` and a progress bar."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from svp.models.loading import LoadedVLM, PromptInputs

log = logging.getLogger(__name__)


def question_inputs(vlm: LoadedVLM, image: Image.Image, question: str) -> PromptInputs:
    """A probe question as one user turn (image + text, no system prompt), tokenised like
    :meth:`LoadedVLM.prompt_inputs` tokenises the SVP prompts."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    text = str(vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return vlm.text_inputs(image, text)


@torch.inference_mode()
def generate_texts(
    vlm: LoadedVLM,
    prompts: Sequence[PromptInputs],
    max_new_tokens: int,
    batch_size: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    desc: str = "generating",
    progress: bool = True,
) -> list[str]:
    """One completion per prompt, in order: greedy when ``temperature == 0``, else sampled (seeded)."""
    torch.manual_seed(seed)
    texts: list[str] = []
    stop = sorted(vlm.stop_token_ids)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        chunk = prompts[start : start + batch_size]
        batch = vlm.collate(chunk, [[] for _ in chunk])
        inputs = {k: v for k, v in batch.model_inputs.items() if k != "position_ids"}
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
            if temperature > 0
            else {"do_sample": False}
        )
        out = vlm.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=vlm.pad_token_id,
            eos_token_id=stop,
            suppress_tokens=[vlm.image_token_id],
            **sampling,
        )
        new = out[:, batch.prompt_end :]
        for row in new.tolist():
            ids = []
            for t in row:
                if t in stop:
                    break
                ids.append(t)
            texts.append(vlm.decode(ids))
    return texts


YES_WORDS = ("Yes", "yes")
NO_WORDS = ("No", "no")


def first_token_ids(vlm: LoadedVLM, words: Sequence[str]) -> list[int]:
    """The token each of ``words`` starts with when it opens an answer (SentencePiece's "▁Yes", BPE's "Yes")."""
    ids = {int(vlm.tokenizer(w, add_special_tokens=False)["input_ids"][0]) for w in words}
    return sorted(ids)


@torch.inference_mode()
def yes_no_margins(
    vlm: LoadedVLM, prompts: Sequence[PromptInputs], batch_size: int = 32, desc: str = "yes/no margins",
    progress: bool = True,
) -> list[float]:
    """For each prompt, log P(yes) - log P(no) of the answer's first token (each side summed over its
    spellings): the model's graded belief, where greedy decoding only shows which side wins."""
    yes = torch.tensor(first_token_ids(vlm, YES_WORDS))
    no = torch.tensor(first_token_ids(vlm, NO_WORDS))
    margins: list[float] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        chunk = prompts[start : start + batch_size]
        logits = vlm.prefill(chunk, range(len(chunk))).next_logits.float().log_softmax(-1)
        margins += (logits[:, yes].logsumexp(-1) - logits[:, no].logsumexp(-1)).tolist()
    return margins
