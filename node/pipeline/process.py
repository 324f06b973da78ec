"""``process``: the pure processing function, (dataset, model, options) -> Evidence.

decode -> coarse lesion segmentation (to frame the crop) -> preprocess (crop +
resize to the model input) -> classify + Grad-CAM (batched) -> segment the
lesion on the model input. No network, no journal, no files: the same code
runs in ``dermnode serve``, ``dermnode process``, the benchmark and a worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from node.model.classifier import Classifier
from node.pipeline.decode import check_header, decode_rgb
from node.pipeline.preprocess import coarse_view, frame
from node.pipeline.result import Evidence
from node.pipeline.segment import segment_lesion


@dataclass(frozen=True)
class ProcessOptions:
    max_pixels: int = 60_000_000


@dataclass(frozen=True)
class Prepared:
    """One image decoded and framed, ready for the model."""

    model_input: np.ndarray
    crop: object
    source_shape: tuple[int, int]
    metadata: dict


def read_metadata(ds: Dataset) -> dict:
    """Optional model inputs from the DICOM header: age (years), sex, anatomic site code."""
    out: dict[str, object] = {}
    age = str(ds.get("PatientAge", "") or "")
    if len(age) == 4 and age[:3].isdigit():
        factor = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}.get(age[3])
        if factor:
            out["age"] = round(int(age[:3]) * factor, 2)
    sex = str(ds.get("PatientSex", "") or "")
    if sex in ("M", "F", "O"):
        out["sex"] = sex
    regions = ds.get("AnatomicRegionSequence")
    if regions:
        item = regions[0]
        if "CodeValue" in item:
            out["site"] = (str(item.CodeValue), str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeMeaning", "")))
    return out


def prepare(ds: Dataset, classifier: Classifier, options: ProcessOptions) -> Prepared:
    """Decode and frame one dataset (CPU work that can run in a pool)."""
    check_header(ds, options.max_pixels)
    image = decode_rgb(ds)
    spec = classifier.card.input
    coarse_mask = None
    if spec.framing == "lesion-crop":
        small, scale = coarse_view(image)
        seg = segment_lesion(small)
        coarse_mask = _upscale_mask(seg.mask, image.shape[:2]) if seg.ok else None
    model_input, crop = frame(image, spec, coarse_mask)
    return Prepared(model_input, crop, (int(image.shape[0]), int(image.shape[1])), read_metadata(ds))


def _upscale_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = (np.arange(shape[0]) * mask.shape[0] // max(1, shape[0])).clip(0, mask.shape[0] - 1)
    cols = (np.arange(shape[1]) * mask.shape[1] // max(1, shape[1])).clip(0, mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def finish(prepared: list[Prepared], classifier: Classifier) -> list[Evidence]:
    """Classify + Grad-CAM a batch of prepared images, then segment each model input."""
    batch = np.stack([p.model_input for p in prepared])
    probs, cams = classifier.predict(batch, [p.metadata for p in prepared])
    out = []
    for i, p in enumerate(prepared):
        out.append(
            Evidence(
                model_input=p.model_input,
                crop=p.crop,
                probabilities=np.asarray(probs[i], dtype=np.float64),
                cam=np.asarray(cams[i], dtype=np.float32),
                segmentation=segment_lesion(p.model_input),
                card=classifier.card,
                source_shape=p.source_shape,
                metadata=p.metadata,
            )
        )
    return out


def process(ds: Dataset, classifier: Classifier, options: ProcessOptions = ProcessOptions()) -> Evidence:
    """The whole pipeline for one dataset."""
    return finish([prepare(ds, classifier, options)], classifier)[0]
