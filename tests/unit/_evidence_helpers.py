"""Test helpers for the evidence builders: a minimal model card, synthetic Evidence, sources.

The sources are real fixture JPEGs wrapped by :func:`node.dicomize.wrap_jpeg`
(JPEG Baseline, as a dermatoscope sends them), written to bytes and read back, so
the builders see what the node sees after spooling.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.evidence.identity import NodeIdentity
from node.model.card import ModelCard
from node.pipeline.result import Crop, Evidence, Segmentation

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "data" / "fixtures" / "images"
FIXTURE = FIXTURES / "ISIC_0000000.jpg"

#: HAM10000 classes with the SNOMED CT codes of shared/docs/dicom-reference.md.
CLASSES = (
    ("akiec", "Actinic keratosis / intraepithelial carcinoma", "201101007", "Actinic keratosis"),
    ("bcc", "Basal cell carcinoma", "254701007", "Basal cell carcinoma of skin"),
    ("bkl", "Benign keratosis", "72100002", "Solar lentigo"),
    ("df", "Dermatofibroma", "72464004", "Dermatofibroma"),
    ("mel", "Melanoma", "93655004", "Malignant melanoma of skin"),
    ("nv", "Melanocytic nevus", "400096001", "Melanocytic nevus"),
    ("vasc", "Vascular lesion", "400210000", "Hemangioma"),
)

CREATED = dt.datetime(2026, 2, 3, 4, 5, 6)
IDENTITY = NodeIdentity(device_serial_number="TEST-0001", institution_name="Test Clinic")


def make_card(*, version: str = "1.0.0", demo: bool = True, untrained: bool = False) -> ModelCard:
    return ModelCard.model_validate(
        {
            "model": {
                "name": "dermnode-test-cnn",
                "version": version,
                "uid": "2.25.1234567890123456789",
                "manufacturer": "dermnode project",
                "intended_use": "unit tests",
                "demo": demo,
                "untrained": untrained,
            },
            "architecture": {"name": "efficientnet_lite0", "cam_layer": "_bn1"},
            "classes": [
                {"code": c, "display": d, "snomed": s, "snomed_meaning": m, "malignant": c in ("mel", "bcc", "akiec")}
                for c, d, s, m in CLASSES
            ],
        }
    )


def disc_mask(rows: int, cols: int, radius_fraction: float = 0.3) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    r = radius_fraction * min(rows, cols)
    return (yy - rows / 2 + 0.5) ** 2 + (xx - cols / 2 + 0.5) ** 2 <= r * r


def make_evidence(
    card: ModelCard | None = None,
    *,
    size: tuple[int, int] = (224, 224),
    seg_ok: bool = True,
    failure: str = "",
    top: int = 4,
    crop: Crop | None = None,
    source_shape: tuple[int, int] = (0, 0),
    seed: int = 7,
) -> Evidence:
    """Synthetic but fixed Evidence: smooth-ish RGB, a disc mask, a blob CAM, softmax probabilities."""
    card = card or make_card()
    rows, cols = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    base = np.stack([xx / cols, yy / rows, 1 - xx / cols], axis=-1) * 200
    model_input = np.clip(base + rng.normal(0, 20, (rows, cols, 3)), 0, 255).astype(np.uint8)

    cam = np.exp(-(((yy - rows * 0.45) / (rows * 0.2)) ** 2 + ((xx - cols * 0.55) / (cols * 0.25)) ** 2))
    cam = cam + rng.uniform(0, 0.05, (rows, cols))
    cam = (cam / cam.max()).astype(np.float32)

    logits = rng.normal(0, 1, len(card.classes))
    logits[top] += 4.0
    probs = np.exp(logits) / np.exp(logits).sum()

    if seg_ok:
        seg = Segmentation(mask=disc_mask(rows, cols), ok=True)
    else:
        seg = Segmentation(mask=np.zeros((rows, cols), dtype=bool), ok=False, failure=failure or "empty mask")
    return Evidence(
        model_input=model_input,
        crop=crop or Crop(100, 50, 500, 450, "lesion-crop"),
        probabilities=probs.astype(np.float64),
        cam=cam,
        segmentation=seg,
        card=card,
        source_shape=source_shape,
    )


def _reread(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def make_source(
    sop_class: str = "dermoscopic",
    *,
    patient_name: str = "Doe^Jane",
    character_set: str | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    tracking_id: str | None = None,
    site: str | None = "back",
    laterality: str | None = None,
    fixture: Path = FIXTURE,
) -> Dataset:
    """A source instance as received: a fixture JPEG wrapped, written and read back."""
    from node.dicomize import wrap_jpeg

    ds = wrap_jpeg(
        fixture,
        patient_name=patient_name,
        patient_id="EV0001",
        patient_sex="F",
        patient_age=54,
        patient_birth_date="19711203",
        sop_class=sop_class,
        site=site,
        laterality=laterality,
        accession="ACC-42",
        tracking_id=tracking_id,
        character_set=character_set,
    )
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
    return _reread(ds)


def reread(ds: Dataset) -> Dataset:
    """Write ``ds`` as a DICOM file in memory and read it back."""
    return _reread(ds)


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
