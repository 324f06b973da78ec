"""The lesion mask as a BINARY Segmentation (one segment, "Lesion") on the resized image.

A photograph has no plane geometry, so the SEG is given the nominal geometry of
the model-input grid (:func:`node.evidence.image.geometry_source`), the same as
the Parametric Map. When the segmentation failed, the SEG is still written (a
valid object with an empty frame, the failure in its ContentDescription) so the
result set stays complete; the SR then does not reference it.
"""

from __future__ import annotations

import copy
import datetime as _dt

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from node.evidence import codes, uids
from node.evidence.identity import NodeIdentity
from node.evidence.image import (
    check_source,
    dicom_date,
    dicom_time,
    describe,
    fit,
    geometry_source,
    plane_geometry,
    set_contributing_equipment,
    software_versions,
    stamp,
)
from node.evidence.header import code_item, finish_instance, sop_instance
from node.evidence.multiframe import POSITION_DIMENSION, SEGMENT_DIMENSION, multiframe_image, pack_binary
from node.pipeline.result import Evidence

KIND = "seg"
SEGMENT_NUMBER = 1
SEGMENT_LABEL = "Lesion"


def anatomic_regions(source: Dataset) -> list[hd.sr.CodedConcept]:
    """The source's AnatomicRegionSequence as CodedConcepts (modifiers kept)."""
    out = []
    for item in source.get("AnatomicRegionSequence", []):
        concept = hd.sr.CodedConcept.from_dataset(item)
        if "AnatomicRegionModifierSequence" in item:
            concept.AnatomicRegionModifierSequence = copy.deepcopy(
                item.AnatomicRegionModifierSequence
            )
        out.append(concept)
    return out


def lesion_mask(evidence: Evidence) -> np.ndarray:
    """The mask to encode: the lesion mask, or an empty one when segmentation failed."""
    seg = evidence.segmentation
    mask = np.asarray(seg.mask)
    expected = evidence.model_input.shape[:2]
    if mask.shape != expected:
        raise ValueError(
            f"segmentation mask shape {mask.shape} does not match the model input {expected}"
        )
    if not seg.ok:
        return np.zeros(expected, dtype=bool)
    if mask.dtype != bool:
        mask = mask != 0
    return mask


def reference_build_seg(
    source: Dataset,
    image: Dataset,
    evidence: Evidence,
    identity: NodeIdentity,
    created: _dt.datetime,
) -> Dataset:
    """The SEG built the straightforward way, with highdicom's Segmentation class.

    :func:`build_seg` must produce the same bytes (tests/unit/test_evidence_fastpath.py).
    """
    check_source(source)
    card = evidence.card
    mask = lesion_mask(evidence)
    tracking_id, tracking_uid = uids.tracking(source)
    seg_state = evidence.segmentation

    parameters = {"segmentation method": fit(64, seg_state.method or "unspecified")}
    description = hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.LESION_CATEGORY,
        segmented_property_type=codes.LESION_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=card.model.name,
            family=dcm_codes.cid7162.ArtificialIntelligence,
            version=card.model.version,
            parameters=parameters,
        ),
        tracking_uid=tracking_uid,
        tracking_id=tracking_id,
        anatomic_regions=anatomic_regions(source) or None,
    )

    content = _content_description(evidence)

    geometry = plane_geometry(source, evidence)
    seg = hd.seg.Segmentation(
        source_images=[geometry_source(image, geometry)],
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=uids.series_uid(source, card, KIND),
        series_number=codes.SERIES_NUMBER[KIND],
        sop_instance_uid=uids.instance_uid(source, card, KIND),
        instance_number=1,
        manufacturer=identity.manufacturer,
        manufacturer_model_name=identity.model_name,
        software_versions=software_versions(identity, card),
        device_serial_number=identity.device_serial_number,
        content_label="LESION",
        content_description=content,
        omit_empty_frames=False,  # an empty (failed) mask still gives one valid frame
        series_description=describe("AI lesion segmentation", card),
        content_date=dicom_date(created),
        content_time=dicom_time(created),
        institution_name=identity.institution_name,
    )
    _make_deterministic(seg, source, evidence, created)
    return seg


def _content_description(evidence: Evidence) -> str:
    card, seg_state = evidence.card, evidence.segmentation
    if seg_state.ok:
        content = f"Lesion mask, {card.model.name} {card.model.version}"
    else:
        content = f"EMPTY: segmentation failed ({seg_state.failure or 'unknown reason'})"
    return fit(64, content)


def _make_deterministic(
    ds: Dataset, source: Dataset, evidence: Evidence, created: _dt.datetime
) -> None:
    """Replace highdicom's random UIDs and wall-clock times (idempotent resends)."""
    stamp(ds, created)
    set_contributing_equipment(ds, source, created)
    dim_uid = uids.dimension_organization_uid(source, evidence.card, KIND)
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in ds.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid
    for shared in ds.get("SharedFunctionalGroupsSequence", []):
        for measures in shared.get("PixelMeasuresSequence", []):
            if "SpacingBetweenSlices" in measures:  # meaningless for one photograph
                del measures.SpacingBetweenSlices


# --- the fast path ---------------------------------------------------------------------
# The same object set up directly (see node/evidence/header.py): one frame, one segment,
# the nominal plane geometry of the model-input grid.


def _code_sequence(code) -> list[Dataset]:
    return [code_item(code)]


def _segment_description(source: Dataset, evidence: Evidence) -> Dataset:
    card = evidence.card
    tracking_id, tracking_uid = uids.tracking(source)
    item = Dataset()
    item.SegmentNumber = SEGMENT_NUMBER
    item.SegmentLabel = SEGMENT_LABEL
    item.SegmentedPropertyCategoryCodeSequence = _code_sequence(codes.LESION_CATEGORY)
    item.SegmentedPropertyTypeCodeSequence = _code_sequence(codes.LESION_TYPE)
    item.SegmentAlgorithmType = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC.value
    item.SegmentAlgorithmName = card.model.name
    algorithm = Dataset()
    algorithm.AlgorithmName = card.model.name
    algorithm.AlgorithmVersion = card.model.version
    algorithm.AlgorithmFamilyCodeSequence = _code_sequence(dcm_codes.cid7162.ArtificialIntelligence)
    method = fit(64, evidence.segmentation.method or "unspecified")
    algorithm.AlgorithmParameters = f"segmentation method={method}"
    item.SegmentationAlgorithmIdentificationSequence = [algorithm]
    item.TrackingID = tracking_id
    item.TrackingUID = tracking_uid
    regions = anatomic_regions(source)
    if regions:
        item.AnatomicRegionSequence = regions
    return item


def build_seg(
    source: Dataset,
    image: Dataset,
    evidence: Evidence,
    identity: NodeIdentity,
    created: _dt.datetime,
) -> Dataset:
    """BINARY SEG of the lesion on ``image`` (the resized image built from ``source``).

    The same bytes as :func:`reference_build_seg`, without highdicom's general-case
    checks and copies (~10 times faster).
    """
    check_source(source)
    card = evidence.card
    mask = lesion_mask(evidence)
    geometry = plane_geometry(source, evidence)
    ds = sop_instance(
        image,
        sop_class_uid=codes.SEGMENTATION,
        sop_instance_uid=uids.instance_uid(source, card, KIND),
        series_instance_uid=uids.series_uid(source, card, KIND),
        series_number=codes.SERIES_NUMBER[KIND],
        modality="SEG",
        series_description=describe("AI lesion segmentation", card),
        identity=identity,
        card=card,
        created=created,
    )
    ds.SegmentationType = "BINARY"
    ds.ContentLabel = "LESION"
    ds.ContentDescription = _content_description(evidence)
    ds.SegmentSequence = [_segment_description(source, evidence)]
    ds.SegmentsOverlap = "NO"
    dim_uid = uids.dimension_organization_uid(source, card, KIND)
    multiframe_image(
        ds,
        image,
        geometry,
        bits_allocated=1,
        image_type=["DERIVED", "PRIMARY"],
        derivation=codes.SEGMENTATION_DERIVATION,
        dimension_organization_uid=dim_uid,
        dimensions=[SEGMENT_DIMENSION, *POSITION_DIMENSION],
        dimension_index_values=[SEGMENT_NUMBER, 1],
    )
    shared = ds.SharedFunctionalGroupsSequence[0]
    identification = Dataset()
    identification.ReferencedSegmentNumber = SEGMENT_NUMBER
    shared.SegmentIdentificationSequence = [identification]
    ds.add_new(0x7FE00010, "OB", pack_binary(mask))  # Pixel Data: OB for 1-bit frames
    finish_instance(ds, image, source, created)
    return ds
