"""The model card: what a model package declares about itself.

A model package is a directory holding ``card.toml`` and ``weights.safetensors``.
The card is parsed with :mod:`tomllib` (no code execution) and validated here
with pydantic, so a broken card fails with a message naming the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CARD_FILE = "card.toml"
WEIGHTS_FILE = "weights.safetensors"

_UID_CHARS = set("0123456789.")


class CardError(ValueError):
    """A model package whose card or weights cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Strict):
    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=16)
    #: Stable UID of this model as a device; used as the SR Device Observer UID.
    uid: str
    manufacturer: str = "dermnode project"
    #: Free-text intended use, shown in SeriesDescription-level outputs.
    intended_use: str
    #: True for a demo/research model: every output says "not for diagnostic use".
    demo: bool = True
    #: True only for a model whose classifier head was never trained.
    untrained: bool = False
    description: str = ""

    @field_validator("uid")
    @classmethod
    def _uid(cls, v: str) -> str:
        if not v or len(v) > 64 or not set(v) <= _UID_CHARS or v.startswith(".") or ".." in v:
            raise ValueError(f"not a valid DICOM UID: {v!r}")
        return v


class Architecture(_Strict):
    #: "efficientnet_lite0".."efficientnet_lite4", or a torchvision.models builder name.
    name: str
    #: Dotted module path of the Grad-CAM target layer, e.g. "_bn1" or "layer4".
    cam_layer: str


class InputSpec(_Strict):
    size: tuple[int, int] = (224, 224)  # rows, columns
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    #: How a full dermoscopy frame becomes the model input:
    #: "lesion-crop": square crop around the segmented lesion (centre fallback), then resize;
    #: "center-crop": largest centred square, then resize; "resize": plain resize (aspect not kept).
    framing: Literal["lesion-crop", "center-crop", "resize"] = "lesion-crop"
    #: Margin around the lesion bounding box, as a fraction of its larger side.
    crop_margin: float = Field(default=0.25, ge=0.0, le=2.0)
    #: Optional DICOM metadata the model consumes (age in years, sex M/F/O, anatomic site code).
    metadata: tuple[Literal["age", "sex", "site"], ...] = ()


class ClassSpec(_Strict):
    code: str = Field(min_length=1, max_length=16)
    display: str = Field(min_length=1, max_length=64)
    snomed: str = Field(pattern=r"^[0-9]{6,18}$")
    snomed_meaning: str = Field(min_length=1, max_length=64)
    malignant: bool = False


class Training(_Strict):
    data: str = ""
    licence: str = ""
    split: str = ""
    recipe: str = ""


class Evaluation(_Strict):
    split: str = ""
    n: int = 0
    balanced_accuracy: float | None = None
    melanoma_auc: float | None = None
    recall: dict[str, float] = {}
    full_frame: dict[str, float | int | str] = {}
    notes: str = ""


class ModelCard(_Strict):
    model: ModelInfo
    architecture: Architecture
    input: InputSpec = InputSpec()
    classes: tuple[ClassSpec, ...] = Field(min_length=2)
    training: Training = Training()
    evaluation: Evaluation = Evaluation()

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: tuple[ClassSpec, ...]) -> tuple[ClassSpec, ...]:
        codes = [c.code for c in v]
        if len(set(codes)) != len(codes):
            raise ValueError(f"class codes must be unique, got {codes}")
        return v

    @property
    def label(self) -> str:
        """Short human label used in descriptions, e.g. 'demo model, not for diagnostic use'."""
        if self.model.untrained:
            return "UNTRAINED placeholder model, not a classifier, not for diagnostic use"
        if self.model.demo:
            return "demo model, not for diagnostic use"
        return f"model {self.model.name} {self.model.version}"

    @property
    def class_codes(self) -> list[str]:
        return [c.code for c in self.classes]


def read_card(path: str | Path) -> ModelCard:
    """Read and validate ``card.toml`` from a model package directory (or the file itself)."""
    p = Path(path)
    card_path = p / CARD_FILE if p.is_dir() else p
    if not card_path.is_file():
        raise CardError(f"model card not found: {card_path}")
    try:
        data = tomllib.loads(card_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CardError(f"model card {card_path} is not valid TOML: {exc}") from exc
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise CardError(f"model card {card_path} is invalid: {problems}") from exc
