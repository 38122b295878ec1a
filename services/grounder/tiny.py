"""A tiny random-initialised GroundingDINO of the real architecture, saved like a real checkpoint.

No weights can be downloaded here, so the grounder's tests and benchmark load this model with
``from_pretrained`` exactly as they would load ``IDEA-Research/grounding-dino-tiny``: a Swin
backbone, a BERT text encoder with an offline WordPiece tokenizer, a deformable encoder and a
decoder with at least two layers, and a :class:`~transformers.GroundingDinoProcessor` (the PIL
image processor; torchvision is not needed).

The vocabulary puts ``[CLS]``, ``[SEP]``, ``.`` and ``?`` at the ids of ``bert-base-uncased``
(101, 102, 1012, 1029): GroundingDINO's modelling code hard-codes those ids to split the text
query into phrases, so a tokenizer with other ids would silently give one phrase-blind query.

Its outputs are random but deterministic for a seed; the box head's last layer is re-drawn from
a normal distribution (DETR initialises it to zero, which would put every box exactly on its
anchor) so that boxes depend on the image and overlap each other, which NMS tests need, and the
token logits are scaled down so that probabilities spread over (0, 1) instead of saturating.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
)
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

log = logging.getLogger(__name__)

# bert-base-uncased ids that GroundingDINO's modelling code treats as phrase delimiters.
_FIXED_IDS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1012: ".", 1029: "?"}

DEFAULT_WORDS: tuple[str, ...] = tuple(
    """
    a an the of and with on in at to is are there
    small large big tiny red green blue yellow orange purple pink black white gray brown
    circle square triangle diamond star rectangle shape object
    cat dog person man woman car bus tree table chair cup ball bird horse
    """.split()
)


def build_vocabulary(words: Iterable[str] = DEFAULT_WORDS) -> list[str]:
    """WordPiece vocabulary: BERT's special tokens at their bert-base-uncased ids, then ``words``.

    The ids that ``bert-base-uncased`` gives to ordinary tokens below 1030 are filled with
    ``[unusedN]`` placeholders; ``words`` are lower-cased and deduplicated.
    """
    vocab = [_FIXED_IDS.get(i, f"[unused{i}]") for i in range(max(_FIXED_IDS) + 1)]
    seen = set(vocab)
    for word in words:
        word = word.lower()
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def build_tokenizer(vocab_file: Path) -> BertTokenizer:
    """A lower-casing BERT WordPiece tokenizer over ``vocab_file`` (one token a line)."""
    vocab = {token: i for i, token in enumerate(vocab_file.read_text().splitlines())}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def build_tiny_grounding_dino(
    out_dir: str | Path,
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
    num_queries: int = 30,
    decoder_layers: int = 2,
    image_shortest_edge: int = 64,
    image_longest_edge: int = 96,
    max_text_len: int = 64,
    box_head_std: float = 0.05,
    logit_scale: float = 0.15,
) -> Path:
    """Save a random GroundingDINO + its processor to ``out_dir`` (``from_pretrained``-loadable).

    ``num_queries`` boxes come out per image; images are resized so their short side is
    ``image_shortest_edge`` (long side at most ``image_longest_edge``); text queries hold at most
    ``max_text_len`` tokens. Returns ``out_dir``.
    """
    if decoder_layers < 2:
        raise ValueError("decoder_layers must be >= 2 (iterative box refinement needs two)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(build_vocabulary(words)) + "\n")
    tokenizer = build_tokenizer(vocab_file)

    # A dict (with its model_type) rather than SwinConfig(...): the typed constructor lacks out_indices.
    backbone = dict(
        model_type="swin",
        embed_dim=8,
        patch_size=2,  # keeps the extra (4th) feature level at least 2 x 2 for its GroupNorm on 64-px images
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        image_size=image_shortest_edge,
        out_indices=[2, 3, 4],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_text_len,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,  # GroupNorm(32, d_model) in the input projections needs a multiple of 32
        encoder_layers=1,
        decoder_layers=decoder_layers,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=num_queries,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=max_text_len,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    with torch.no_grad():
        last = model.bbox_embed[0].layers[-1]  # shared by every decoder layer (decoder_bbox_embed_share)
        last.weight.normal_(0.0, box_head_std)
        last.bias.normal_(0.0, box_head_std)
        # Token logits are dot products of LayerNorm'd decoder states with text states: at random
        # init they are large and their sigmoids saturate at 0 or 1. Scaling the decoder's final
        # LayerNorm brings them to O(1), so box and text thresholds inside (0, 1) separate boxes.
        model.model.decoder.layer_norm.weight.mul_(logit_scale)
        model.model.decoder.layer_norm.bias.mul_(logit_scale)
    model.save_pretrained(out)

    image_processor = GroundingDinoImageProcessorPil(
        size={"shortest_edge": image_shortest_edge, "longest_edge": image_longest_edge}
    )
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    log.info("tiny GroundingDINO (%d parameters) saved to %s", sum(p.numel() for p in model.parameters()), out)
    return out
