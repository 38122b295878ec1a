"""ShapesWorld language: reference captions written from the ground truth, and the parser that
reads back which objects a caption mentions (for CHAIR-style recall and hallucination).

Every caption starts "In the image, " (the paper's instruction) and describes each object by its
position first ("In the image, at the top left there is a large red circle."), the phrasing a
small model learns far more easily than position-last wording. :func:`canonical_caption` is the
one form the base VLM is trained to write; :func:`reference_captions` adds varied templates so
CIDEr/BLEU/METEOR/ROUGE-L compare against several references, as on COCO.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from svp.world.scenes import COLOURS, POSITION_PHRASES, SHAPES, SIZES, SceneObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_PLURALS = {s: s + "s" for s in SHAPES}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def object_sentence(obj: SceneObject) -> str:
    """``at the top left there is a large red circle`` (no capital, no full stop)."""
    return f"{POSITION_PHRASES[obj.position]} there is {_article(obj.phrase)}"


def canonical_caption(objects: Sequence[SceneObject]) -> str:
    """The form the base VLM learns: one position-first sentence per object, in the given order."""
    if not objects:
        return "In the image, there are no objects."
    sentences = [object_sentence(o) for o in objects]
    return "In the image, " + ". ".join([sentences[0]] + [_cap(s) for s in sentences[1:]]) + "."


def _count_phrase(n: int) -> str:
    return "there is one object" if n == 1 else f"there are {NUMBER_WORDS[n]} objects"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _relation_sentence(objects: Sequence[SceneObject]) -> str | None:
    """One relation between the first two objects (cells differ, so one always holds)."""
    if len(objects) < 2:
        return None
    a, b = objects[0], objects[1]
    if a.cell[0] != b.cell[0]:
        rel = "above" if a.cell[0] < b.cell[0] else "below"
    else:
        rel = "to the left of" if a.cell[1] < b.cell[1] else "to the right of"
    return f"The {a.phrase} is {rel} the {b.phrase}."


def reference_captions(objects: Sequence[SceneObject]) -> list[str]:
    """Five references per scene in varied templates, all starting "In the image, "."""
    if not objects:
        return ["In the image, there are no objects."]
    objs = list(objects)
    refs = [canonical_caption(objs)]
    refs.append(
        f"In the image, {_count_phrase(len(objs))}. "
        + " ".join(_cap(object_sentence(o)) + "." for o in objs)
    )
    refs.append(
        "In the image, "
        + " ".join(
            (_article(o.phrase) if i == 0 else _cap(_article(o.phrase))) + f" is {POSITION_PHRASES[o.position]}."
            for i, o in enumerate(objs)
        )
    )
    listed = "In the image, there is " + _join([f"{_article(o.phrase)} {POSITION_PHRASES[o.position]}" for o in objs])
    rel = _relation_sentence(objs)
    refs.append(listed + "." + (f" {rel}" if rel else ""))
    first, rest = objs[0], objs[1:]
    we_see = f"In the image, we can see {_article(first.phrase)} {POSITION_PHRASES[first.position]}."
    refs.append(we_see + "".join(f" There is also {_article(o.phrase)} {POSITION_PHRASES[o.position]}." for o in rest))
    return refs


def region_expression(obj: SceneObject) -> str:
    """The referring expression of one object (REG target): ``a small red circle``."""
    return _article(obj.phrase)


# ---------------------------------------------------------------- reading objects back from text

_COUNTS = {"a": 1, "an": 1, "one": 1, **{w: i for i, w in enumerate(NUMBER_WORDS) if i > 1}}
_MENTION = re.compile(
    r"\b(?:(?P<det>the|a|an|" + "|".join(NUMBER_WORDS[1:]) + r")\s+)?"
    r"(?:(?:" + "|".join(SIZES) + r")\s+)?"
    r"(?:(?P<colour>" + "|".join(COLOURS) + r")\s+)?"
    r"(?P<shape>" + "|".join(list(_PLURALS.values()) + list(SHAPES)) + r")\b"
)


def mentioned_objects(caption: str) -> Counter[str]:
    """The objects a caption asserts, as a multiset of kinds (``red circle``; ``circle`` when no colour).

    A phrase led by "the" refers back to an object already mentioned and adds nothing; a number
    word counts ("two red circles" asserts two); any other phrase asserts one object.
    """
    found: Counter[str] = Counter()
    for m in _MENTION.finditer(caption.lower()):
        det = m.group("det")
        if det == "the":
            continue
        shape = m.group("shape")
        shape = shape[:-1] if shape.endswith("s") and shape[:-1] in SHAPES else shape
        kind = f"{m.group('colour')} {shape}" if m.group("colour") else shape
        found[kind] += _COUNTS.get(det, 1) if det else 1
    return found


def domain_words() -> list[str]:
    """Every word ShapesWorld text uses (captions, probes, answers), for the VLM's tokenizer."""
    words = ["In", "the", "image", ",", ".", "there", "is", "are", "a", "an", "no", "objects", "object"]
    words += ["At", "On", "In", "at", "on", "in", "we", "can", "see", "We", "There", "also", "and", "The"]
    words += ["to", "of", "left", "right", "top", "bottom", "center", "above", "below", "A", "An"]
    words += list(SIZES) + list(COLOURS) + list(SHAPES) + list(_PLURALS.values())
    words += list(NUMBER_WORDS) + [str(i) for i in range(10)]
    words += ["Is", "How", "many", "Answer", "question", "using", "single", "word", "or", "phrase", "Yes", "No"]
    words += ["yes", "Please", "provide", "short", "description", "for", "this", "region", ":", "[", "]", "?"]
    return words
