"""The Grad-CAM heat map as a float32 Parametric Map on the resized image grid.

The Real World Value Mapping says what the values are: Quantity (246205007, SCT)
= (130403, DCM, "Gradient-weighted class activation"), units ("1", UCUM, "no
units"), identity slope/intercept, range 0..1, and the normalisation in its LUT
Explanation. The map carries the top class in its Content Label/Description,
the anatomy of the source in Frame Anatomy, and the nominal image-plane
geometry of the model-input grid (shared with the SEG).
"""

from __future__ import annotations

import copy
import datetime as _dt

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node.evidence import codes, uids
from node.evidence.identity import NodeIdentity
from node.evidence.image import (
    check_source,
    dicom_date,
    dicom_time,
    describe,
    fit,
    geometry_source,
    image_laterality,
    plane_geometry,
    set_contributing_equipment,
    software_versions,
    stamp,
)
from node.evidence.header import code_item, finish_instance, sop_instance
from node.evidence.multiframe import POSITION_DIMENSION, multiframe_image
from node.pipeline.result import CAM_NORMALISATION, Evidence

KIND = "pmap"

#: Tolerance on the 0..1 range of the CAM (float rounding of a max-normalisation).
_RANGE_TOLERANCE = 1e-5


def content_label(code: str) -> str:
    """CS Content Label (<= 16 chars, A-Z 0-9 _ space) naming the top class."""
    label = "".join(ch if ch.isalnum() else "_" for ch in f"GRADCAM_{code}".upper())
    return label[:16]


def check_cam(evidence: Evidence) -> np.ndarray:
    cam = evidence.cam
    if not isinstance(cam, np.ndarray):
        raise TypeError("evidence.cam must be a numpy array")
    expected = evidence.model_input.shape[:2]
    if cam.shape != expected:
        raise ValueError(f"evidence.cam shape {cam.shape} does not match the model input {expected}")
    cam = np.asarray(cam, dtype=np.float32)
    if not np.all(np.isfinite(cam)):
        raise ValueError("evidence.cam contains NaN or infinite values")
    lo, hi = float(cam.min()), float(cam.max())
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"evidence.cam must lie in [0, 1], got [{lo}, {hi}]")
    return cam


def reference_build_pmap(
    source: Dataset,
    image: Dataset,
    evidence: Evidence,
    identity: NodeIdentity,
    created: _dt.datetime,
) -> Dataset:
    """The Parametric Map built the straightforward way, with highdicom's ParametricMap class.

    :func:`build_pmap` must produce the same bytes (tests/unit/test_evidence_fastpath.py).
    """
    check_source(source)
    cam = check_cam(evidence)
    card = evidence.card
    top = evidence.top_class

    mapping = hd.pm.RealWorldValueMapping(
        lut_label="GRADCAM",
        lut_explanation=_lut_explanation(top.code),
        unit=codes.NO_UNITS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=codes.GRAD_CAM,
    )
    geometry = plane_geometry(source, evidence)
    recognizable = str(image.get("RecognizableVisualFeatures", "NO")) == "YES"

    pm = hd.pm.ParametricMap(
        source_images=[geometry_source(image, geometry)],
        pixel_array=cam,
        series_instance_uid=uids.series_uid(source, card, KIND),
        series_number=codes.SERIES_NUMBER[KIND],
        sop_instance_uid=uids.instance_uid(source, card, KIND),
        instance_number=1,
        manufacturer=identity.manufacturer,
        manufacturer_model_name=identity.model_name,
        software_versions=software_versions(identity, card),
        device_serial_number=identity.device_serial_number,
        contains_recognizable_visual_features=recognizable,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=0.5, window_width=1.0)
        ],
        content_label=content_label(top.code),
        content_description=_content_description(top),
        series_description=describe(f"AI Grad-CAM {top.code}", card),
        content_date=dicom_date(created),
        content_time=dicom_time(created),
        institution_name=identity.institution_name,
    )
    _finish(pm, source, evidence, geometry.calibrated, created)
    return pm


def _finish(
    pm: Dataset, source: Dataset, evidence: Evidence, calibrated: bool, created: _dt.datetime
) -> None:
    stamp(pm, created)
    set_contributing_equipment(pm, source, created)
    dim_uid = uids.dimension_organization_uid(source, evidence.card, KIND)
    for item in pm.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in pm.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid

    shared = pm.SharedFunctionalGroupsSequence[0]
    for measures in shared.get("PixelMeasuresSequence", []):
        if "SpacingBetweenSlices" in measures:  # meaningless for one photograph
            del measures.SpacingBetweenSlices

    _add_frame_anatomy(shared, source)
    text = _derivation_description(evidence, calibrated)
    for frame in pm.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            derivation.DerivationDescription = text


def _lut_explanation(code: str) -> str:
    return fit(64, CAM_NORMALISATION, f"Grad-CAM of class {code}, 0..1")


def _content_description(top) -> str:
    return fit(64, f"Grad-CAM, top class {top.code} {top.display}", f"Grad-CAM, top class {top.code}")


def _add_frame_anatomy(shared: Dataset, source: Dataset) -> None:
    """Frame Anatomy: the photographed site and its laterality, where the source says."""
    laterality = image_laterality(source)
    if "AnatomicRegionSequence" in source and laterality is not None:
        anatomy = Dataset()
        anatomy.AnatomicRegionSequence = copy.deepcopy(source.AnatomicRegionSequence)
        anatomy.FrameLaterality = laterality
        shared.FrameAnatomySequence = [anatomy]


def _derivation_description(evidence: Evidence, calibrated: bool) -> str:
    """The normalisation and the geometry in full (LUT Explanation is only 64 characters)."""
    spacing_note = (
        "pixel spacing from the source calibration, rescaled"
        if calibrated
        else "nominal 1 mm pixel spacing (the source has no calibration)"
    )
    return (
        f"{CAM_NORMALISATION}. Top class: {evidence.top_class.code} "
        f"({evidence.top_class.display}); model {evidence.card.model.name} "
        f"{evidence.card.model.version}. Grid: the resized image (model input), {spacing_note}."
    )[:1024]


# --- the fast path ---------------------------------------------------------------------
# The same object set up directly (see node/evidence/header.py): one float32 frame on
# the nominal plane geometry of the model-input grid.


def _real_world_value_mapping(code: str) -> Dataset:
    item = Dataset()
    item.LUTExplanation = _lut_explanation(code)
    item.MeasurementUnitsCodeSequence = [code_item(codes.NO_UNITS)]
    item.LUTLabel = "GRADCAM"
    item.DoubleFloatRealWorldValueLastValueMapped = 1.0
    item.DoubleFloatRealWorldValueFirstValueMapped = 0.0
    quantity = Dataset()
    quantity.ValueType = "CODE"
    quantity.ConceptNameCodeSequence = [code_item(codes.QUANTITY)]
    quantity.ConceptCodeSequence = [code_item(codes.GRAD_CAM)]
    item.QuantityDefinitionSequence = [quantity]
    item.RealWorldValueIntercept = 0.0
    item.RealWorldValueSlope = 1.0
    return item


def build_pmap(
    source: Dataset,
    image: Dataset,
    evidence: Evidence,
    identity: NodeIdentity,
    created: _dt.datetime,
) -> Dataset:
    """Parametric Map of ``evidence.cam`` on ``image`` (the resized image of ``source``).

    The same bytes as :func:`reference_build_pmap`, without highdicom's general-case
    checks and copies (~10 times faster).
    """
    check_source(source)
    cam = check_cam(evidence)
    card = evidence.card
    top = evidence.top_class
    geometry = plane_geometry(source, evidence)
    recognizable = str(image.get("RecognizableVisualFeatures", "NO")) == "YES"
    pm = sop_instance(
        image,
        sop_class_uid=codes.PARAMETRIC_MAP,
        sop_instance_uid=uids.instance_uid(source, card, KIND),
        series_instance_uid=uids.series_uid(source, card, KIND),
        series_number=codes.SERIES_NUMBER[KIND],
        modality="OT",
        series_description=describe(f"AI Grad-CAM {top.code}", card),
        identity=identity,
        card=card,
        created=created,
    )
    pm.ContentQualification = "RESEARCH"
    pm.ContentLabel = content_label(top.code)
    pm.ContentDescription = _content_description(top)
    pm.AcquisitionContextSequence = []
    pm.PixelPresentation = "MONOCHROME"
    image_type = ["DERIVED", "PRIMARY", "VOLUME", "QUANTITY"]
    multiframe_image(
        pm,
        image,
        geometry,
        bits_allocated=32,
        image_type=image_type,
        derivation=codes.PMAP_DERIVATION,
        dimension_organization_uid=uids.dimension_organization_uid(source, card, KIND),
        dimensions=list(POSITION_DIMENSION),
        dimension_index_values=1,
        float_pixels=True,
        burned_in_annotation=False,
        recognizable_visual_features=recognizable,
    )
    shared = pm.SharedFunctionalGroupsSequence[0]
    voi = Dataset()
    voi.WindowCenter = "0.5"
    voi.WindowWidth = "1.0"
    shared.FrameVOILUTSequence = [voi]
    transformation = Dataset()
    transformation.RescaleIntercept = "0.0"
    transformation.RescaleSlope = "1.0"
    transformation.RescaleType = "US"
    shared.PixelValueTransformationSequence = [transformation]
    frame_type = Dataset()
    frame_type.FrameType = list(image_type)
    shared.ParametricMapFrameTypeSequence = [frame_type]
    shared.RealWorldValueMappingSequence = [_real_world_value_mapping(top.code)]
    _add_frame_anatomy(shared, source)
    text = _derivation_description(evidence, geometry.calibrated)
    pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].DerivationDescription = text
    pm.FloatPixelData = np.ascontiguousarray(cam, dtype="<f4").tobytes()
    finish_instance(pm, image, source, created)
    return pm
