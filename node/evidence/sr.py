"""The classification result as a Comprehensive 3D SR holding a TID 1500 Measurement Report.

Content tree (IHE AI Results style)::

    Imaging Measurement Report (TID 1500)
      Language, Observer = device (TID 1004: Device Observer UID = model UID, ...)
      Procedure reported = (363679005, SCT, "Imaging procedure") (CID 100)
      Image Library (TID 1600): the original image and the resized image
      Imaging Measurements
        one Measurement Group per class (card order):
          TID 1410 (lesion segment referenced) or TID 1501 (segmentation failed)
          Tracking Identifier + UID (the source's TrackingID/UID, else derived)
          Finding (121071) = the class's SNOMED CT code
          Finding Site (+ laterality) from the source's anatomy
          Algorithm Identification (TID 4019): model name + version
          NUM Probability (122157, DCM), units ("1", UCUM)
          [top class] IMAGE Visual explanation (130401, DCM) -> Parametric Map
      Qualitative Evaluations (TID 1500 row 12), TEXT Comment (row 14):
          [demo/untrained model] not for diagnostic use, with model name + version
          [segmentation failed] the failure reason

Workarounds for highdicom 0.28 (see shared/docs/dicom-reference.md):
  * its TID 1601 modality lookup lacks Dermoscopic Photography, so the image
    library is built here from the same content items, with (DMS, DCM);
  * ``ReferencedSegmentationFrame`` writes both Referenced Frame Number and
    Referenced Segment Number, which are mutually exclusive in the SOP
    Instance Reference macro: the frame number is removed (the SEG has one
    frame, the segment number says which segment);
  * random UIDs / ``now()`` are replaced so that rebuilds are byte-identical.
"""

from __future__ import annotations

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
    image_laterality,
    metadata_copy,
    set_contributing_equipment,
    software_versions,
    source_spacing,
    stamp,
)
from node.pipeline.result import Evidence

KIND = "sr"

_R = hd.sr.RelationshipTypeValues
_PIXELS = hd.sr.CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")
_MM = hd.sr.CodedConcept(value="mm", meaning="millimeter", scheme_designator="UCUM")
_SOURCE = hd.sr.CodedConcept(value="260753009", meaning="Source", scheme_designator="SCT")


# --- image library (TID 1600 / 1601 / 1602) ------------------------------------------


def _library_entry(image: Dataset) -> hd.sr.ImageContentItem:
    """TID 1601 entry: an IMAGE item with its TID 1602 descriptors."""
    sop_class = str(image.SOPClassUID)
    try:
        modality = codes.MODALITY_CODE[sop_class]
    except KeyError:
        raise ValueError(f"no modality code for SOP class {sop_class}") from None
    item = hd.sr.ImageContentItem(
        name=_SOURCE,
        referenced_sop_class_uid=sop_class,
        referenced_sop_instance_uid=str(image.SOPInstanceUID),
        relationship_type=_R.CONTAINS,
    )
    desc = [
        hd.sr.CodeContentItem(
            name=dcm_codes.DCM.Modality, value=modality, relationship_type=_R.HAS_ACQ_CONTEXT
        )
    ]
    if "FrameOfReferenceUID" in image:
        desc.append(
            hd.sr.UIDRefContentItem(
                name=dcm_codes.DCM.FrameOfReferenceUID,
                value=str(image.FrameOfReferenceUID),
                relationship_type=_R.HAS_ACQ_CONTEXT,
            )
        )
    for name, value in (
        (dcm_codes.DCM.PixelDataRows, int(image.Rows)),
        (dcm_codes.DCM.PixelDataColumns, int(image.Columns)),
    ):
        desc.append(
            hd.sr.NumContentItem(
                name=name, value=value, unit=_PIXELS, relationship_type=_R.HAS_ACQ_CONTEXT
            )
        )
    spacing = source_spacing(image) if "PixelSpacing" in image else None
    if spacing is not None:
        for name, value in (
            (dcm_codes.DCM.HorizontalPixelSpacing, spacing[1]),
            (dcm_codes.DCM.VerticalPixelSpacing, spacing[0]),
        ):
            desc.append(
                hd.sr.NumContentItem(
                    name=name, value=value, unit=_MM, relationship_type=_R.HAS_ACQ_CONTEXT
                )
            )
    laterality = codes.LATERALITY.get(str(image.get("ImageLaterality", "")))
    if laterality is not None:
        desc.append(
            hd.sr.CodeContentItem(
                name=dcm_codes.DCM.ImageLaterality,
                value=laterality,
                relationship_type=_R.HAS_ACQ_CONTEXT,
            )
        )
    item.ContentSequence = hd.sr.ContentSequence(desc)
    return item


def image_library(images: list[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one Image Library Group holding every image."""
    group = hd.sr.ContainerContentItem(
        name=dcm_codes.DCM.ImageLibraryGroup, relationship_type=_R.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence([_library_entry(im) for im in images])
    library = hd.sr.ContainerContentItem(
        name=dcm_codes.DCM.ImageLibrary, relationship_type=_R.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


# --- measurement groups ---------------------------------------------------------------


def finding_sites(source: Dataset) -> list[hd.sr.FindingSite]:
    laterality = codes.LATERALITY.get(image_laterality(source) or "")
    sites = []
    for item in source.get("AnatomicRegionSequence", []):
        sites.append(
            hd.sr.FindingSite(
                anatomic_location=hd.sr.CodedConcept.from_dataset(item),
                laterality=laterality,
            )
        )
    return sites


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=codes.COMMENT, value=text[:10240], relationship_type=_R.CONTAINS
    )


def _fix_segment_reference(group: Dataset) -> None:
    """Pitfall #3: keep only Referenced Segment Number in the 121214 IMAGE item.

    Also use the PS3.16 meaning of (121233, DCM) ("Source image for
    segmentation"; highdicom capitalises it differently).
    """
    for item in group.ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        name = item.ConceptNameCodeSequence[0]
        if name.CodingSchemeDesignator != "DCM":
            continue
        if name.CodeValue == "121214":
            for ref in item.ReferencedSOPSequence:
                if "ReferencedSegmentNumber" in ref and "ReferencedFrameNumber" in ref:
                    del ref.ReferencedFrameNumber
        elif name.CodeValue == dcm_codes.DCM.SourceImageForSegmentation.value:
            name.CodeMeaning = dcm_codes.DCM.SourceImageForSegmentation.meaning


def measurement_groups(
    source: Dataset,
    image: Dataset,
    seg: Dataset,
    pmap: Dataset,
    evidence: Evidence,
) -> list:
    card = evidence.card
    probs = np.asarray(evidence.probabilities, dtype=np.float64)
    if probs.shape != (len(card.classes),):
        raise ValueError(
            f"evidence.probabilities has shape {probs.shape}, the card has {len(card.classes)} classes"
        )
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
        raise ValueError("evidence.probabilities must be finite and within [0, 1]")
    top = evidence.top_index
    tracking_id, tracking_uid = uids.tracking(source)
    sites = finding_sites(source)
    seg_ok = evidence.segmentation.ok

    groups = []
    for index, (spec, p) in enumerate(zip(card.classes, probs)):
        common = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking_id),
            finding_type=codes.class_code(spec),
            algorithm_id=hd.sr.AlgorithmIdentification(
                name=card.model.name, version=card.model.version
            ),
            finding_sites=sites or None,
            measurements=[
                hd.sr.Measurement(name=codes.PROBABILITY, value=float(p), unit=codes.NO_UNITS)
            ],
        )
        if seg_ok:
            group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=hd.sr.ReferencedSegmentationFrame(
                    sop_class_uid=str(seg.SOPClassUID),
                    sop_instance_uid=str(seg.SOPInstanceUID),
                    frame_number=1,
                    segment_number=1,
                    source_image=hd.sr.SourceImageForSegmentation(
                        referenced_sop_class_uid=str(image.SOPClassUID),
                        referenced_sop_instance_uid=str(image.SOPInstanceUID),
                    ),
                ),
                **common,
            )
            _fix_segment_reference(group[0])
        else:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(**common)
        content = group[0].ContentSequence
        if index == top:
            content.append(
                hd.sr.ImageContentItem(
                    name=codes.VISUAL_EXPLANATION,
                    referenced_sop_class_uid=str(pmap.SOPClassUID),
                    referenced_sop_instance_uid=str(pmap.SOPInstanceUID),
                    relationship_type=_R.CONTAINS,
                )
            )
        groups.append(group)
    return groups


def notices(evidence: Evidence) -> list[str]:
    """Free-text notices of the report: intended use and segmentation failure."""
    card = evidence.card
    out = []
    if card.model.untrained or card.model.demo:
        out.append(f"{card.model.name} {card.model.version}: {card.label}.")
    if not evidence.segmentation.ok:
        reason = evidence.segmentation.failure or "unknown reason"
        out.append(
            f"Lesion segmentation failed ({reason}): the measurement groups reference "
            "no segment; the SEG of this result is empty."
        )
    return out


def qualitative_evaluations(texts: list[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 container holding TEXT items (row 14)."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=_R.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence([_comment(t) for t in texts])
    return container


def _referenced_uids(items) -> set[str]:
    out = set()
    for item in items:
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            out.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        if "ContentSequence" in item:
            out |= _referenced_uids(item.ContentSequence)
    return out


def _check_references(root: Dataset, evidence: list[Dataset]) -> None:
    """Every instance referenced in the tree is listed as evidence (as highdicom checks)."""
    missing = _referenced_uids(root.ContentSequence) - {str(e.SOPInstanceUID) for e in evidence}
    if missing:
        raise ValueError(f"SR references instances not given as evidence: {sorted(missing)}")


# --- the document ----------------------------------------------------------------------


def build_sr(
    source: Dataset,
    image: Dataset,
    seg: Dataset,
    pmap: Dataset,
    evidence: Evidence,
    identity: NodeIdentity,
    created: _dt.datetime,
) -> Dataset:
    """TID 1500 Comprehensive 3D SR of the classification of ``source``."""
    check_source(source)
    card = evidence.card

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=card.model.uid,
        name=fit(64, f"{card.model.name} {card.model.version}"),
        manufacturer_name=card.model.manufacturer,
        model_name=card.model.name,
        serial_number=identity.device_serial_number,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=measurement_groups(source, image, seg, pmap, evidence),
    )
    # Pitfall #1: insert our own TID 1600 Image Library before Imaging Measurements.
    root = report[0].ContentSequence
    root.insert(len(root) - 1, image_library([source, image]))
    texts = notices(evidence)
    if texts:
        root.append(qualitative_evaluations(texts))

    # The first evidence item supplies patient/study: a copy, so that the SR
    # shares no data elements with the caller's source dataset.
    evidence_datasets = [metadata_copy(source), image, seg, pmap]
    _check_references(report[0], evidence_datasets)
    # Performance: highdicom's SR constructor deep-copies the whole content tree,
    # re-parses it into typed items and searches it (twice, with more deep
    # copies) for references: ~3/4 of the build time. The tree here was just
    # built by highdicom's validating template classes and is owned by nobody
    # else, so the document is created around a one-item stand-in root and the
    # real root's attributes are then moved in, uncopied.
    stand_in = hd.sr.ContainerContentItem(
        name=report[0].ConceptNameCodeSequence[0], template_id="1500"
    )
    stand_in.ContentSequence = hd.sr.ContentSequence()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence_datasets,
        content=stand_in,
        series_instance_uid=uids.series_uid(source, card, KIND),
        series_number=codes.SERIES_NUMBER[KIND],
        sop_instance_uid=uids.instance_uid(source, card, KIND),
        instance_number=1,
        manufacturer=identity.manufacturer,
        manufacturer_model_name=identity.model_name,
        software_versions=software_versions(identity, card),
        device_serial_number=identity.device_serial_number,
        institution_name=identity.institution_name,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=describe("AI dermoscopy classification", card),
        content_date=dicom_date(created),
        content_time=dicom_time(created),
    )
    for elem in report[0]:
        sr[elem.tag] = elem
    sr._content = report  # what highdicom's ``content`` property returns
    stamp(sr, created)
    set_contributing_equipment(sr, source, created)
    return sr
