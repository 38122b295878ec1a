"""The label mask is exact: only the answer tokens and the token that ends each answer are trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from svp.models.loading import LoadedVLM, load_vlm
from svp.models.tiny import build_tiny_vlm
from svp.prompts import PAPER_PROMPTS
from svp.training.collator import IGNORE_INDEX, ConversationCollator, SampleTooLongError
from svp.training.dataset import ConversationSample, Turn
from tests.svp.training.fixtures import scene_image

CAPTION = "In the image, there is a red circle in the center. It is small."
FORMATS = [("llava", "llava_v1"), ("llava_next", "mistral_instruct"), ("llava", "qwen_1_5")]


@pytest.fixture(scope="module", params=FORMATS, ids=[f"{a}-{f}" for a, f in FORMATS])
def vlm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedVLM:
    arch, chat_format = request.param
    path = build_tiny_vlm(tmp_path_factory.mktemp(f"{arch}-{chat_format}"), arch=arch, chat_format=chat_format)
    return load_vlm(path)


def _selected(caption: str = CAPTION) -> ConversationSample:
    return ConversationSample("s", "unused", (Turn(PAPER_PROMPTS.base, caption),))


def _end_token(vlm: LoadedVLM) -> str:
    return "<|im_end|>" if vlm.chat_format == "qwen_1_5" else vlm.tokenizer.eos_token


def _unmasked(batch_ids: torch.Tensor, labels: torch.Tensor, row: int) -> list[int]:
    mask = labels[row] != IGNORE_INDEX
    assert torch.equal(labels[row][mask], batch_ids[row][mask])  # labels are the tokens themselves
    return batch_ids[row][mask].tolist()


def test_unmasked_positions_decode_to_answer_plus_end_token(vlm: LoadedVLM) -> None:
    collator = ConversationCollator(vlm, max_length=512)
    image = scene_image("red", "circle")
    batch = collator.collate([collator.encode(_selected(), image), collator.encode(_selected("In the image, a dog."), image)])
    ids = batch.model_inputs["input_ids"]
    end = _end_token(vlm)
    end_id = vlm.tokenizer.convert_tokens_to_ids(end)
    for row, caption in enumerate([CAPTION, "In the image, a dog."]):
        unmasked = _unmasked(ids, batch.labels, row)
        assert unmasked == vlm.tokenizer(caption, add_special_tokens=False)["input_ids"] + [end_id]
        assert vlm.tokenizer.decode(unmasked[:-1]) == caption
        assert vlm.tokenizer.convert_ids_to_tokens(unmasked[-1]) == end
    # Image placeholders, the prompt and padding are all masked.
    assert (batch.labels[ids == vlm.image_token_id] == IGNORE_INDEX).all()
    assert (batch.labels[batch.model_inputs["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch.supervised_tokens == int((batch.labels != IGNORE_INDEX).sum())


def test_training_prompt_is_the_sampling_prompt(vlm: LoadedVLM) -> None:
    # The model is trained on exactly the tokens the sampler prompts it with (base prompt, no grounding).
    image = scene_image("blue", "square")
    encoded = ConversationCollator(vlm, 512).encode(_selected(), image)
    inference = vlm.prompt_inputs(image, "base")
    assert torch.equal(encoded.prompt.input_ids, inference.input_ids)
    assert encoded.prompt.vision.keys() == inference.vision.keys()
    for key, value in inference.vision.items():
        assert torch.equal(encoded.prompt.vision[key], value)
    assert "<context>" not in vlm.tokenizer.decode(encoded.prompt.input_ids)


def test_multi_turn_vq_supervises_every_answer_without_system_prompt(vlm: LoadedVLM) -> None:
    sample = ConversationSample("q", "unused", (Turn("What color is the object?", "It is red."),
                                                Turn("What is the shape?", "It is a circle.")), "vq")
    collator = ConversationCollator(vlm, 512)
    batch = collator.collate([collator.encode(sample, scene_image("red", "circle"))])
    end_id = vlm.tokenizer.convert_tokens_to_ids(_end_token(vlm))
    tok = vlm.tokenizer
    expected = (tok("It is red.", add_special_tokens=False)["input_ids"] + [end_id]
                + tok("It is a circle.", add_special_tokens=False)["input_ids"] + [end_id])
    assert _unmasked(batch.model_inputs["input_ids"], batch.labels, 0) == expected
    text = tok.decode(batch.model_inputs["input_ids"][0])
    assert "What is the shape?" in text
    assert "visual-language assistant" not in text  # no SVP system prompt on instruction data


def test_truncation_cuts_text_never_image_tokens(vlm: LoadedVLM) -> None:
    image = scene_image("red", "circle")
    full = ConversationCollator(vlm, 512).encode(_selected(), image)
    n_image = int((full.prompt.input_ids == vlm.image_token_id).sum())
    prompt_text = len(full.prompt) - n_image + 1  # the image counts as one token
    max_length = prompt_text + 5
    cut = ConversationCollator(vlm, max_length).encode(_selected(), image)
    assert int((cut.prompt.input_ids == vlm.image_token_id).sum()) == n_image
    assert torch.equal(cut.prompt.input_ids, full.prompt.input_ids)
    assert cut.suffix_ids == full.suffix_ids[:5]
    assert cut.suffix_labels == full.suffix_ids[:5]  # the first 5 answer tokens, all supervised
    with pytest.raises(SampleTooLongError, match="no answer token within max_length"):
        ConversationCollator(vlm, prompt_text).encode(_selected(), image)


def test_model_loss_is_the_mean_over_answer_tokens(vlm: LoadedVLM) -> None:
    collator = ConversationCollator(vlm, 512)
    image = scene_image("green", "circle")
    batch = collator.collate([collator.encode(_selected(), image), collator.encode(_selected("In the image."), image)])
    with torch.no_grad():
        out = vlm.model(**batch.model_inputs, labels=batch.labels, use_cache=False)
    # Independently: log-softmax of the logits at every position that predicts an unmasked token.
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    targets = batch.labels[:, 1:]
    nll = [-float(logp[r, t, targets[r, t]]) for r in range(2) for t in range(targets.shape[1])
           if targets[r, t] != IGNORE_INDEX]
    assert len(nll) == batch.supervised_tokens
    assert float(out.loss) == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_collator_loads_images_from_paths(vlm: LoadedVLM, tmp_path: Path) -> None:
    scene_image("yellow", "square").save(tmp_path / "x.png")
    sample = ConversationSample("s", str(tmp_path / "x.png"), (Turn(PAPER_PROMPTS.base, CAPTION),))
    batch = ConversationCollator(vlm, 512)([sample])
    direct = ConversationCollator(vlm, 512).encode(sample, scene_image("yellow", "square"))
    assert batch.model_inputs["input_ids"][0, -len(direct.suffix_ids):].tolist() == direct.suffix_ids
