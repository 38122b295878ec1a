"""An offline word-level tokenizer for the models this project builds itself.

No tokenizer can be downloaded here, so tiny test models and the ShapesWorld VLM use a word-level
vocabulary built with the ``tokenizers`` library:

* pre-tokenization splits on whitespace and isolates every punctuation character
  (``"image,"`` -> ``"image"``, ``","``), so the vocabulary holds plain words;
* decoding joins words with spaces and removes the space before punctuation (the WordPiece
  decoder's clean-up), so ``"In the image, there is a red circle."`` round-trips exactly;
  newlines and runs of spaces are not kept (they are not tokens);
* ``<s>`` is prepended when special tokens are added (the Llama convention the LLaVA chat
  formats expect); ``</s>`` ends an assistant turn through the chat template;
* ``<image>`` (and, for ``qwen_1_5``, ``<|im_start|>`` / ``<|im_end|>``) are special tokens that
  are matched before pre-tokenization, so ``"<image><image>"`` is two image tokens.

Words are case-sensitive; anything outside the vocabulary is ``<unk>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from svp.prompts import CHAT_TEMPLATES, PAPER_PROMPTS

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# Words each chat template writes around the turns; always in the vocabulary so prompts have no <unk>.
CHAT_FORMAT_WORDS = {
    "llava_v1": ["USER", ":", "ASSISTANT"],
    "mistral_instruct": ["[", "INST", "]", "/"],
    "qwen_1_5": ["system", "user", "assistant"],
}

# Same split as the pre-tokenizer (BertPreTokenizer: whitespace, then each punctuation character).
_PIECES = re.compile(r"\w+|[^\w\s]", re.UNICODE)

# Words of captions about simple scenes, on top of the prompts' own words, so a tiny test model can
# produce and score readable text.
_COMMON_WORDS = """
a an the this that these those there here it its is are was were be been being has have had do does
and or but not no yes with without of in on at to from by for into onto over under above below behind
beside between near next far left right top bottom center middle corner side front back edge upper lower
one two three four five six seven eight nine ten several some many few each every both all other another
small large big tiny huge medium little long short tall wide narrow round square flat thin thick
red green blue yellow orange purple pink brown black white gray grey cyan magenta dark light bright
circle circles square squares triangle triangles rectangle rectangles star stars shape shapes object objects
ellipse hexagon cross diamond ring dot line lines
man woman person people child boy girl dog cat bird horse car bus truck bicycle boat train plane
table chair cup bottle plate bowl book phone laptop tree grass sky cloud road street building house
wall floor window door water sea sand snow field mountain hill sign light pole fence bench bag ball
background foreground scene image picture photo view area region part
appears appear seems seem shows show showing shown visible located positioned placed situated sitting
standing lying holding wearing looking walking running near close closer away together alone
first second third last also only just very more most less than as while which who where what
describe description detailed details count counts position positions relative color colour colors size
""".split()


def default_vocabulary() -> list[str]:
    """Words for tiny test models: every word of the Appendix F prompts, common scene words, numbers."""
    prompt_text = " ".join(
        [PAPER_PROMPTS.system_sampling, PAPER_PROMPTS.system_grounded, PAPER_PROMPTS.base, PAPER_PROMPTS.grounded]
    )
    words = _PIECES.findall(prompt_text) + _COMMON_WORDS
    words += [w.capitalize() for w in _COMMON_WORDS]
    words += [str(i) for i in range(101)] + [f"{i:02d}" for i in range(10)]
    words += list(".,;:!?()[]<>/-'\"*")
    return words


def build_word_tokenizer(words: Iterable[str], chat_format: str = "llava_v1") -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words`` with the special tokens and chat template of ``chat_format``.

    Each entry of ``words`` is split like text is (``"image,"`` gives ``"image"`` and ``","``) and
    deduplicated in first-seen order; ids follow that order after the special tokens
    (``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, ``<image>`` = 4, then the ChatML
    tokens for ``qwen_1_5``) and the words the chat template writes (``USER``, ``INST``, ...), so
    equal inputs always give equal ids.
    """
    if chat_format not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat format {chat_format!r}; known: {', '.join(CHAT_TEMPLATES)}")
    specials = [PAD, BOS, EOS, UNK, IMAGE] + (list(CHATML_TOKENS) if chat_format == "qwen_1_5" else [])
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for entry in [*CHAT_FORMAT_WORDS[chat_format], *words]:
        for piece in _PIECES.findall(entry):
            vocab.setdefault(piece, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    extra = [IMAGE, *CHATML_TOKENS] if chat_format == "qwen_1_5" else [IMAGE]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=extra,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATES[chat_format]
    return tokenizer
