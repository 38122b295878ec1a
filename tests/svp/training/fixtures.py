"""Training data for the trainer tests: small scenes (one coloured shape each) with captions the
tiny models' word vocabulary covers, written as LLaVA conversation JSONL, and an independent
measure of how likely a model finds the training targets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from svp.models.loading import LoadedVLM
from svp.prompts import PAPER_PROMPTS
from svp.training.collator import IGNORE_INDEX, ConversationCollator
from svp.training.dataset import ConversationSample

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square")


def scene_image(colour: str, shape: str, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def selected_record(sample_id: str, image: str, caption: str, question: str | None = None) -> dict:
    return {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question or PAPER_PROMPTS.base}"},
            {"from": "gpt", "value": caption},
        ],
    }


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_scenes(data_root: Path, n: int, subdir: str = "scenes") -> list[tuple[str, str]]:
    """``n`` scene PNGs under ``data_root/subdir``; returns (relative image path, caption) pairs."""
    out = []
    combos = [(c, s) for s in SHAPES for c in COLOURS]
    for i in range(n):
        colour, shape = combos[i % len(combos)]
        rel = f"{subdir}/{i}.png"
        (data_root / subdir).mkdir(parents=True, exist_ok=True)
        scene_image(colour, shape).save(data_root / rel)
        out.append((rel, f"In the image, there is a {colour} {shape} in the center."))
    return out


def write_selected(data_root: Path, path: Path, n: int) -> Path:
    scenes = write_scenes(data_root, n)
    return write_jsonl(path, [selected_record(f"s{i}", rel, cap) for i, (rel, cap) in enumerate(scenes)])


def write_vq(data_root: Path, path: Path, n: int) -> Path:
    scenes = write_scenes(data_root, n, subdir="vq")
    records = []
    for i, (rel, caption) in enumerate(scenes):
        colour = caption.split()[5]
        records.append(selected_record(f"vq{i}", rel, f"It is {colour}.", question="What color is the object?"))
    return write_jsonl(path, records)


@torch.no_grad()
def target_logprob(vlm: LoadedVLM, samples: Sequence[ConversationSample], max_length: int = 512) -> float:
    """Sum over samples of log p(answer tokens + end token | prompt, image), from the logits by
    log-softmax (not through the model's loss), with the collator's labels choosing the positions."""
    collator = ConversationCollator(vlm, max_length)
    batch = collator(samples)
    logits = vlm.model(**batch.model_inputs, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(picked[mask].sum())
