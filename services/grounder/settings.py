"""Settings of the grounder (env prefix ``SVP_GROUNDER_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from svp.contract import PhraseExtractor
from svp.grounding import BOX_THRESHOLD, NMS_IOU
from svp.service import ServiceSettings

GrounderBackend = Literal["groundingdino", "shapesworld"]


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SVP_GROUNDER_", extra="ignore")

    backend: GrounderBackend = Field(
        default="groundingdino",
        description="'groundingdino': transformers' GroundingDINO; 'shapesworld': the ShapesWorld detector.",
    )
    model: str = Field(
        default="IDEA-Research/grounding-dino-tiny",
        description="GroundingDINO checkpoint: Hugging Face id or local directory (groundingdino backend).",
    )
    device: str = Field(default="cpu", description="torch device of the GroundingDINO model, e.g. 'cuda:0'.")
    box_threshold: float = Field(
        default=BOX_THRESHOLD, ge=0.0, le=1.0, description="Keep a box when its best token probability exceeds this."
    )
    text_threshold: float = Field(
        default=0.25, ge=0.0, le=1.0, description="A phrase matches a box when one of its tokens exceeds this."
    )
    nms_iou: float = Field(
        default=NMS_IOU, ge=0.0, le=1.0, description="Class-agnostic NMS: boxes overlapping above this IoU keep the best."
    )
    shapes_partial_matches: bool = Field(
        default=True,
        description="shapesworld backend: a phrase that matches no object fully gets its best partial match, "
                    "labelled with the phrase's words that match, at half the score, as GroundingDINO boxes "
                    "a near miss; false: the strict detector, no box at all (svp.world.detector).",
    )
    max_caption_chars: int = Field(default=2000, ge=1, le=4000, description="Longer captions are refused (422).")
    max_batch_size: int = Field(default=8, ge=1, le=64, description="Items per forward pass.")
    phrase_extractor: PhraseExtractor = Field(
        default="rules",
        description="How captions become phrases: 'rules' (no model) or 'spacy' (needs spaCy and en_core_web_sm; "
                    "the grounder is not ready without them). Every grounding result names it.",
    )
