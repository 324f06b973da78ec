"""``process``: the pure processing function, (dataset, model, options) -> Evidence.

decode -> coarse lesion segmentation (to frame the crop) -> preprocess (crop +
resize to the model input) -> segment the lesion on the model input ->
classify + Grad-CAM (batched). No network, no journal, no files: the same code
runs in ``dermnode serve``, ``dermnode process``, the benchmark and a worker.

Everything but the model call is in :func:`prepare`, which needs only the model
card: it runs in the worker thread or in a process pool that never imports
torch (:mod:`node.executor.pool`). :func:`classify` is the one model call, on a
batch; :func:`assemble` joins its output with the prepared image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset

from node.model.card import ModelCard
from node.pipeline.decode import check_header, decode_rgb
from node.pipeline.preprocess import coarse_view, frame
from node.pipeline.result import Evidence, Segmentation
from node.pipeline.segment import segment_lesion

if TYPE_CHECKING:  # the classifier imports torch; this module must not
    from node.model.classifier import Classifier


@dataclass(frozen=True)
class ProcessOptions:
    max_pixels: int = 60_000_000


@dataclass(frozen=True)
class Prepared:
    """One image decoded, framed and segmented, ready for the model."""

    model_input: np.ndarray
    crop: object
    source_shape: tuple[int, int]
    metadata: dict
    #: The lesion segmentation on the model input (None: computed in :func:`assemble`).
    segmentation: Segmentation | None = None


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


def _card(model: Classifier | ModelCard) -> ModelCard:
    return model if isinstance(model, ModelCard) else model.card


def prepare(
    ds: Dataset,
    classifier: Classifier | ModelCard,
    options: ProcessOptions,
    times: dict[str, float] | None = None,
) -> Prepared:
    """Decode, frame and segment one dataset (CPU work; needs only the model card).

    ``times``, when given, receives the seconds spent in ``decode``, ``frame``
    (coarse segmentation + crop + resize) and ``segment``.
    """
    t0 = time.perf_counter()
    check_header(ds, options.max_pixels)
    image = decode_rgb(ds)
    t1 = time.perf_counter()
    spec = _card(classifier).input
    coarse_mask = None
    if spec.framing == "lesion-crop":
        small, scale = coarse_view(image)
        seg = segment_lesion(small)
        coarse_mask = _upscale_mask(seg.mask, image.shape[:2]) if seg.ok else None
    model_input, crop = frame(image, spec, coarse_mask)
    t2 = time.perf_counter()
    segmentation = segment_lesion(model_input)
    t3 = time.perf_counter()
    if times is not None:
        times.update(decode=t1 - t0, frame=t2 - t1, segment=t3 - t2)
    return Prepared(model_input, crop, (int(image.shape[0]), int(image.shape[1])), read_metadata(ds), segmentation)


def _upscale_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = (np.arange(shape[0]) * mask.shape[0] // max(1, shape[0])).clip(0, mask.shape[0] - 1)
    cols = (np.arange(shape[1]) * mask.shape[1] // max(1, shape[1])).clip(0, mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def classify(prepared: list[Prepared], classifier: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """Classify + Grad-CAM a batch of prepared images in one model call: (probs, cams)."""
    batch = np.stack([p.model_input for p in prepared])
    return classifier.predict(batch, [p.metadata for p in prepared])


def assemble(p: Prepared, probabilities: np.ndarray, cam: np.ndarray, card: ModelCard) -> Evidence:
    """The Evidence of one prepared image from its row of the model output."""
    return Evidence(
        model_input=p.model_input,
        crop=p.crop,
        probabilities=np.asarray(probabilities, dtype=np.float64),
        cam=np.asarray(cam, dtype=np.float32),
        segmentation=p.segmentation if p.segmentation is not None else segment_lesion(p.model_input),
        card=card,
        source_shape=p.source_shape,
        metadata=p.metadata,
    )


def finish(prepared: list[Prepared], classifier: Classifier) -> list[Evidence]:
    """Classify + Grad-CAM a batch of prepared images and return their Evidence."""
    probs, cams = classify(prepared, classifier)
    return [assemble(p, probs[i], cams[i], classifier.card) for i, p in enumerate(prepared)]


def process(ds: Dataset, classifier: Classifier, options: ProcessOptions = ProcessOptions()) -> Evidence:
    """The whole pipeline for one dataset."""
    return finish([prepare(ds, classifier, options)], classifier)[0]
