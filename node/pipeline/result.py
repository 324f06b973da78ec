"""What the pipeline produces for one image: plain arrays and numbers, no DICOM.

``pipeline.process`` returns an :class:`Evidence`; ``evidence.build`` turns it,
together with the source dataset, into the four derived DICOM objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from node.model.card import ModelCard

#: How the Grad-CAM values are scaled (the classifier's normalisation); written into the
#: Parametric Map's LUT Explanation (when it fits) and its Derivation Description.
CAM_NORMALISATION = (
    "ReLU Grad-CAM of the top class, bilinear to the model input grid, "
    "divided by its maximum (0..1; all zeros when the maximum is 0)"
)


@dataclass(frozen=True)
class Crop:
    """The region of the source frame that became the model input, in source pixels.

    ``x0, y0`` inclusive, ``x1, y1`` exclusive. The region may extend past the
    frame (padded with the edge colour); ``padded`` says whether it did.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    method: str  # "lesion-crop" | "center-crop" | "resize"
    padded: bool = False

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True)
class Segmentation:
    """Lesion mask on the model-input grid (rows x cols, bool)."""

    mask: np.ndarray
    ok: bool
    #: Why the segmentation is not usable (empty, full, ...); "" when ok.
    failure: str = ""
    method: str = "otsu-morphology"


@dataclass(frozen=True)
class Evidence:
    """Everything the AI produced for one source image."""

    #: The model input as RGB uint8, rows x cols x 3: this is the "resized image" object.
    model_input: np.ndarray
    crop: Crop
    #: Class probabilities in card class order, float64, sums to 1.
    probabilities: np.ndarray
    #: Grad-CAM for the top class, float32 in [0, 1], on the model-input grid.
    cam: np.ndarray
    segmentation: Segmentation
    card: ModelCard
    #: Source frame size (rows, cols) as decoded.
    source_shape: tuple[int, int] = (0, 0)
    #: Optional metadata passed to the model (age, sex, site) as read from the source.
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def top_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def top_class(self):
        return self.card.classes[self.top_index]
