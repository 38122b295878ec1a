"""COCO-format references: captions (``captions_*.json``) and, for the object metrics, instances
(``instances_*.json``). Works on a ShapesWorld export and on real COCO-style data alike.

On real data the object parser is :class:`CategoryMentions` over the instance file's category
names, with set semantics like the original CHAIR (each category counts once per caption and
once per image); ShapesWorld uses its own counting parser
(:func:`svp.world.language.mentioned_objects`).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CocoReferences:
    """``images``: COCO image id -> file name (relative to the reference file's image root);
    ``captions``: image id -> its reference captions."""

    images: dict[int, str]
    captions: dict[int, list[str]]


def load_captions(path: str | Path) -> CocoReferences:
    data = json.loads(Path(path).read_text())
    images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in data["annotations"]:
        captions[int(ann["image_id"])].append(str(ann["caption"]))
    return CocoReferences(images=images, captions=dict(captions))


def load_objects(path: str | Path, distinct: bool = False) -> tuple[dict[int, Counter[str]], list[str]]:
    """Per image the multiset of its instance categories (a set when ``distinct``), and every category name."""
    data = json.loads(Path(path).read_text())
    names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    objects: dict[int, Counter[str]] = {int(im["id"]): Counter() for im in data["images"]}
    for ann in data["annotations"]:
        objects.setdefault(int(ann["image_id"]), Counter())[names[int(ann["category_id"])]] += 1
    if distinct:
        objects = {k: Counter(set(v)) for k, v in objects.items()}
    return objects, list(names.values())


class CategoryMentions:
    """Which categories a caption mentions: whole-word matches of a name or its plural ("dogs"),
    longest names first so "hot dog" is not also a "dog"; each category counted once."""

    def __init__(self, names: Iterable[str]):
        self.names = sorted(set(names), key=lambda n: (-len(n), n))
        alternatives = "|".join(re.escape(n) for n in self.names)
        self._pattern = re.compile(rf"\b({alternatives})(?:s|es)?\b")

    def __call__(self, caption: str) -> Counter[str]:
        return Counter(set(self._pattern.findall(caption.lower())))
