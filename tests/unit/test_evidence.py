"""Unit tests of the evidence builders: the four derived objects of one source image.

Every object is written to bytes and read back before it is checked, with
highdicom's readers where they exist (segread, imread, srread), so the tests see
what a PACS would store.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _evidence_helpers import (  # noqa: E402
    CREATED,
    FIXTURE,
    IDENTITY,
    make_card,
    make_evidence,
    make_source,
    to_bytes,
)

from node.evidence import codes, uids  # noqa: E402
from node.evidence.build import DerivedObjects, build_evidence  # noqa: E402
from node.pipeline.result import Crop, Segmentation  # noqa: E402

pytestmark = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"fixture image missing: {FIXTURE}")

PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "ReferringPhysicianName", "StudyID",
)


def read(ds) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def read_all(objs: DerivedObjects) -> dict[str, pydicom.Dataset]:
    return {name: read(getattr(objs, name)) for name in objs._fields}


@pytest.fixture(scope="module")
def dms_source():
    return make_source("dermoscopic")


@pytest.fixture(scope="module")
def evidence():
    return make_evidence()


@pytest.fixture(scope="module")
def built(dms_source, evidence):
    return build_evidence(dms_source, evidence, IDENTITY, CREATED)


@pytest.fixture(scope="module")
def files(built):
    return read_all(built)


def _referenced(items) -> set[str]:
    """SOP Instance UIDs referenced anywhere in an SR content tree."""
    out = set()
    for item in items:
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            out.add(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        out |= _referenced(item.get("ContentSequence", []))
    return out


# --- uids -----------------------------------------------------------------------------


def test_derived_uid_is_a_deterministic_2_25_uid():
    a = uids.derived_uid("1.2.3", "model", "1.0", "seg")
    assert a == uids.derived_uid("1.2.3", "model", "1.0", "seg")
    assert a != uids.derived_uid("1.2.3", "model", "1.1", "seg")
    assert a.startswith("2.25.") and a[5:].isdigit() and len(a) <= 64
    assert not a[5:].startswith("0")
    with pytest.raises(ValueError):
        uids.derived_uid()


# --- determinism and identity --------------------------------------------------------------


def test_same_inputs_give_identical_bytes(dms_source, evidence, built):
    again = build_evidence(dms_source, evidence, IDENTITY, CREATED)
    for name in DerivedObjects._fields:
        assert to_bytes(getattr(again, name)) == to_bytes(getattr(built, name)), name


def test_created_time_is_used_for_content_date_time(files):
    for name, ds in files.items():
        assert ds.ContentDate == "20260203", name
        assert ds.ContentTime.startswith("040506"), name
        assert ds.InstanceCreationDate == "20260203", name


def test_other_model_version_gives_other_uids(dms_source, built):
    other = build_evidence(dms_source, make_evidence(make_card(version="2.0.0")), IDENTITY, CREATED)
    for name in DerivedObjects._fields:
        a, b = getattr(built, name), getattr(other, name)
        assert a.SOPInstanceUID != b.SOPInstanceUID, name
        assert a.SeriesInstanceUID != b.SeriesInstanceUID, name
        assert a.StudyInstanceUID == b.StudyInstanceUID, name


def test_uids_follow_source_and_kind(dms_source, built):
    card = make_card()
    for kind in DerivedObjects._fields:
        ds = getattr(built, kind)
        assert ds.SOPInstanceUID == uids.instance_uid(dms_source, card, kind)
        assert ds.SeriesInstanceUID == uids.series_uid(dms_source, card, kind)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID


def test_same_study_and_patient_as_source(dms_source, files):
    for name, ds in files.items():
        for kw in PATIENT_STUDY:
            assert kw in ds, (name, kw)
            assert ds[kw].value == dms_source[kw].value, (name, kw)
        assert ds.get("SpecificCharacterSet") == dms_source.get("SpecificCharacterSet"), name


def test_one_series_per_output_type(dms_source, files):
    series = {ds.SeriesInstanceUID for ds in files.values()}
    assert len(series) == 4 and dms_source.SeriesInstanceUID not in series
    assert sorted(int(ds.SeriesNumber) for ds in files.values()) == [9001, 9002, 9003, 9004]
    assert len({ds.SOPInstanceUID for ds in files.values()}) == 4
    assert files["image"].SOPClassUID == codes.DERMOSCOPIC_PHOTOGRAPHY
    assert files["seg"].SOPClassUID == codes.SEGMENTATION
    assert files["pmap"].SOPClassUID == codes.PARAMETRIC_MAP
    assert files["sr"].SOPClassUID == codes.COMPREHENSIVE_3D_SR


def test_equipment_is_the_node_and_the_dermoscope_contributes(dms_source, files):
    for name, ds in files.items():
        assert ds.Manufacturer == IDENTITY.manufacturer, name
        assert ds.ManufacturerModelName == IDENTITY.model_name, name
        assert ds.DeviceSerialNumber == IDENTITY.device_serial_number, name
        assert "dermnode-test-cnn 1.0.0" in list(ds.SoftwareVersions), name
        acq = [
            item for item in ds.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
        ]
        assert len(acq) == 1, name
        assert acq[0].Manufacturer == dms_source.Manufacturer
        assert acq[0].ManufacturerModelName == dms_source.ManufacturerModelName
        assert acq[0].DeviceSerialNumber == dms_source.DeviceSerialNumber
        assert acq[0].SoftwareVersions == dms_source.SoftwareVersions


def test_every_output_says_not_for_diagnostic_use(files):
    for name, ds in files.items():
        assert "not for diagnostic use" in ds.SeriesDescription, name
        assert len(ds.SeriesDescription) <= 64
    sr_texts = [
        item.TextValue
        for container in files["sr"].ContentSequence
        if container.ValueType == "CONTAINER"
        for item in container.get("ContentSequence", [])
        if item.ValueType == "TEXT"
    ]
    assert any("dermnode-test-cnn 1.0.0" in t and "not for diagnostic use" in t for t in sr_texts)


def test_build_does_not_modify_the_source(evidence):
    source = make_source("dermoscopic")
    before = to_bytes(source)
    objs = build_evidence(source, evidence, IDENTITY, CREATED)
    assert to_bytes(source) == before
    sr_before = to_bytes(objs.sr)
    source.PatientName = "Changed^Afterwards"
    objs.image.PatientName = "Changed^Too"
    assert to_bytes(objs.sr) == sr_before  # no data elements shared with the source


# --- resized image ------------------------------------------------------------------------


def test_resized_image_is_the_model_input(dms_source, evidence, files):
    ds = files["image"]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == "RGB" and ds.PlanarConfiguration == 0
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (224, 224, 3)
    assert np.array_equal(ds.pixel_array, evidence.model_input)
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.Modality == "DMS"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == dms_source.SOPInstanceUID
    assert ds.DerivationCodeSequence[0].CodeValue == "113085"
    assert "224x224" in ds.DerivationDescription and "lesion-crop" in ds.DerivationDescription
    assert ds.LossyImageCompression == "01"  # the source was JPEG
    assert ds.BurnedInAnnotation == "NO"
    assert ds.AnatomicRegionSequence[0].CodeValue == dms_source.AnatomicRegionSequence[0].CodeValue
    assert ds.ImageLaterality == dms_source.ImageLaterality
    assert ds.LightSourcePolarization == dms_source.LightSourcePolarization
    assert "FrameOfReferenceUID" in ds and ds.FrameOfReferenceUID != dms_source.FrameOfReferenceUID
    assert "PixelSpacing" not in ds  # the source has no calibration
    assert "AI model input 224x224" in ds.SeriesDescription


def test_pixel_spacing_is_rescaled_by_crop_and_resize(evidence):
    source = make_source("dermoscopic", pixel_spacing=(0.02, 0.025))
    crop = Crop(0, 0, 448, 672, "resize")  # 448 wide, 672 high -> 224 x 224
    ev = make_evidence(crop=crop)
    objs = read_all(build_evidence(source, ev, IDENTITY, CREATED))
    expected = [0.02 * 672 / 224, 0.025 * 448 / 224]
    assert np.allclose([float(v) for v in objs["image"].PixelSpacing], expected)
    for name in ("seg", "pmap"):
        measures = objs[name].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert np.allclose([float(v) for v in measures.PixelSpacing], expected), name
        assert "SpacingBetweenSlices" not in measures


# --- SEG ------------------------------------------------------------------------------------


def test_seg_round_trip_equals_mask(built, evidence, dms_source):
    seg = hd.seg.segread(io.BytesIO(to_bytes(built.seg)))
    assert seg.SegmentationType == "BINARY"
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[built.image.SOPInstanceUID], segment_numbers=[1]
    )
    assert np.array_equal(px[0, :, :, 0].astype(bool), evidence.segmentation.mask)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Lesion"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    alg = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (alg.AlgorithmName, alg.AlgorithmVersion) == ("dermnode-test-cnn", "1.0.0")
    assert alg.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert segment.AnatomicRegionSequence[0].CodeValue == dms_source.AnatomicRegionSequence[0].CodeValue
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == built.image.SOPInstanceUID
    assert seg.FrameOfReferenceUID == uids.frame_of_reference_uid(dms_source, make_card())


def test_failed_segmentation_gives_valid_empty_seg_and_sr_without_segment(dms_source):
    ev = make_evidence(seg_ok=False, failure="mask covers the whole frame")
    objs = build_evidence(dms_source, ev, IDENTITY, CREATED)
    seg = hd.seg.segread(io.BytesIO(to_bytes(objs.seg)))
    assert int(seg.NumberOfFrames) == 1
    px = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[objs.image.SOPInstanceUID], segment_numbers=[1]
    )
    assert not px.any()
    assert "segmentation failed" in seg.ContentDescription

    sr = hd.sr.srread(io.BytesIO(to_bytes(objs.sr)))
    assert sr.content.get_planar_roi_measurement_groups() == []
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 7
    assert objs.seg.SOPInstanceUID not in _referenced(sr.ContentSequence)  # no segment reference
    texts = [
        item.TextValue
        for container in sr.ContentSequence
        if container.ValueType == "CONTAINER"
        for item in container.get("ContentSequence", [])
        if item.ValueType == "TEXT"
    ]
    assert any("mask covers the whole frame" in t for t in texts)
    # the visual explanation is still there
    top = groups[ev.top_index]
    refs = [i for i in top[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "130401"]
    assert refs and refs[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == objs.pmap.SOPInstanceUID


# --- Parametric Map ----------------------------------------------------------------------------


def test_pmap_round_trip_equals_cam(built, evidence, dms_source):
    raw = pydicom.dcmread(io.BytesIO(to_bytes(built.pmap)))
    assert raw.pixel_array.dtype == np.float32
    assert np.array_equal(raw.pixel_array, evidence.cam)
    image = hd.imread(io.BytesIO(to_bytes(built.pmap)))
    vol = image.get_volume().array
    assert np.array_equal(vol[0].astype(np.float32), evidence.cam)

    shared = raw.SharedFunctionalGroupsSequence[0]
    rwvm = shared.RealWorldValueMappingSequence[0]
    quantity = rwvm.QuantityDefinitionSequence[0]
    assert quantity.ConceptNameCodeSequence[0].CodeValue == "246205007"
    assert quantity.ConceptCodeSequence[0].CodeValue == "130403"
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    assert (rwvm.DoubleFloatRealWorldValueFirstValueMapped, rwvm.DoubleFloatRealWorldValueLastValueMapped) == (0.0, 1.0)
    anatomy = shared.FrameAnatomySequence[0]
    assert anatomy.FrameLaterality == dms_source.ImageLaterality
    assert anatomy.AnatomicRegionSequence[0].CodeValue == dms_source.AnatomicRegionSequence[0].CodeValue
    assert "PlaneOrientationSequence" in shared and "PixelMeasuresSequence" in shared
    assert raw.FrameOfReferenceUID == built.seg.FrameOfReferenceUID
    top = evidence.top_class
    assert top.code.upper() in raw.ContentLabel
    assert top.code in raw.ContentDescription and top.code in raw.SeriesDescription
    derivation = raw.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == built.image.SOPInstanceUID
    assert "Grad-CAM" in derivation.DerivationDescription


def test_pmap_rejects_out_of_range_cam(dms_source):
    ev = make_evidence()
    bad = dataclasses.replace(ev, cam=ev.cam * 3)
    with pytest.raises(ValueError, match="cam"):
        build_evidence(dms_source, bad, IDENTITY, CREATED)


# --- SR ---------------------------------------------------------------------------------------


def test_sr_round_trip_probabilities_and_visual_explanation(built, evidence, dms_source):
    sr = hd.sr.srread(io.BytesIO(to_bytes(built.sr)))
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE", "UNVERIFIED", "PRELIMINARY",
    )
    groups = sr.content.get_planar_roi_measurement_groups()
    card = evidence.card
    assert len(groups) == len(card.classes)
    probs = []
    for spec, group in zip(card.classes, groups):
        assert group.finding_type.value == spec.snomed
        (measurement,) = group.get_measurements(name=codes.PROBABILITY)
        assert measurement.unit.value == "1"
        probs.append(measurement.value)
        ref = group.referenced_segmentation_frame
        assert ref[0].referenced_sop_instance_uid == built.seg.SOPInstanceUID
        assert group.tracking_uid == uids.tracking(dms_source)[1]
        site = group.finding_sites[0]
        assert site.value.value == dms_source.AnatomicRegionSequence[0].CodeValue
        assert site.laterality.value == codes.LATERALITY[dms_source.ImageLaterality].value
    assert np.allclose(probs, evidence.probabilities, rtol=0, atol=1e-12)

    for index, group in enumerate(groups):
        refs = [
            item for item in group[0].ContentSequence
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "130401"
        ]
        if index == evidence.top_index:
            assert len(refs) == 1
            ref = refs[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == built.pmap.SOPInstanceUID
            assert ref.ReferencedSOPClassUID == codes.PARAMETRIC_MAP
        else:
            assert refs == []


def test_sr_segment_reference_has_no_frame_number(built):
    """highdicom pitfall #3: 121214 items carry Referenced Segment Number only."""
    found = 0

    def walk(items):
        nonlocal found
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "121214":
                found += 1
                ref = item.ReferencedSOPSequence[0]
                assert ref.ReferencedSegmentNumber == 1
                assert "ReferencedFrameNumber" not in ref
            walk(item.get("ContentSequence", []))

    walk(read(built.sr).ContentSequence)
    assert found == 7


def test_sr_observer_library_and_evidence(built, dms_source):
    ds = read(built.sr)
    root = ds.ContentSequence
    by_name = {}
    for item in root:
        by_name.setdefault(item.ConceptNameCodeSequence[0].CodeValue, []).append(item)
    assert by_name["121012"][0].UID == make_card().model.uid  # Device Observer UID
    library = by_name["111028"][0]
    entries = [e for g in library.ContentSequence for e in g.ContentSequence if e.ValueType == "IMAGE"]
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == [
        dms_source.SOPInstanceUID, built.image.SOPInstanceUID,
    ]
    for entry in entries:
        modality = [d for d in entry.ContentSequence if d.ConceptNameCodeSequence[0].CodeValue == "121139"]
        assert modality[0].ConceptCodeSequence[0].CodeValue == "DMS"
    referenced = {
        ref.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {
        dms_source.SOPInstanceUID, built.image.SOPInstanceUID,
        built.seg.SOPInstanceUID, built.pmap.SOPInstanceUID,
    }
    assert "not for diagnostic use" in ds.SeriesDescription


def test_source_tracking_identifier_is_reused(evidence):
    source = make_source("dermoscopic", tracking_id="naevus-left-shoulder")
    objs = build_evidence(source, evidence, IDENTITY, CREATED)
    segment = read(objs.seg).SegmentSequence[0]
    assert segment.TrackingUID == source.TrackingUID
    assert segment.TrackingID == "naevus-left-shoulder"
    sr = hd.sr.srread(io.BytesIO(to_bytes(objs.sr)))
    for group in sr.content.get_planar_roi_measurement_groups():
        assert group.tracking_uid == source.TrackingUID
        assert group.tracking_identifier == "naevus-left-shoulder"


# --- sources ------------------------------------------------------------------------------------


def test_non_ascii_patient_name_survives(evidence):
    name = "Müller-Łukasiewicz^Zoë"
    source = make_source("dermoscopic", patient_name=name, character_set="ISO_IR 192")
    files = read_all(build_evidence(source, evidence, IDENTITY, CREATED))
    for kind, ds in files.items():
        assert ds.SpecificCharacterSet == "ISO_IR 192", kind
        assert str(ds.PatientName) == name, kind


def test_vl_photographic_source(evidence):
    source = make_source("vl-photographic")
    files = read_all(build_evidence(source, evidence, IDENTITY, CREATED))
    image = files["image"]
    assert image.SOPClassUID == codes.VL_PHOTOGRAPHIC and image.Modality == "XC"
    assert "FrameOfReferenceUID" not in image  # not in the VL Photographic IOD
    assert "LightSourcePolarization" not in image
    assert files["seg"].FrameOfReferenceUID == files["pmap"].FrameOfReferenceUID
    library = [i for i in files["sr"].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"][0]
    entries = [e for g in library.ContentSequence for e in g.ContentSequence if e.ValueType == "IMAGE"]
    for entry in entries:
        assert entry.ReferencedSOPSequence[0].ReferencedSOPClassUID == codes.VL_PHOTOGRAPHIC
        modality = [d for d in entry.ContentSequence if d.ConceptNameCodeSequence[0].CodeValue == "121139"]
        assert modality[0].ConceptCodeSequence[0].CodeValue == "XC"


def test_source_without_anatomy_or_laterality(evidence):
    source = make_source("dermoscopic", site=None)
    files = read_all(build_evidence(source, evidence, IDENTITY, CREATED))
    assert "FrameAnatomySequence" not in files["pmap"].SharedFunctionalGroupsSequence[0]
    assert "AnatomicRegionSequence" not in files["seg"].SegmentSequence[0]
    sr = hd.sr.srread(io.BytesIO(to_bytes(files["sr"])))
    assert all(g.finding_sites == [] for g in sr.content.get_planar_roi_measurement_groups())


def test_rejects_other_sop_classes_and_mismatched_evidence(dms_source, evidence):
    ct = make_source("dermoscopic")
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(ValueError, match="Dermoscopic Photography or VL Photographic"):
        build_evidence(ct, evidence, IDENTITY, CREATED)
    short = dataclasses.replace(evidence, probabilities=evidence.probabilities[:3])
    with pytest.raises(ValueError, match="probabilities"):
        build_evidence(dms_source, short, IDENTITY, CREATED)
    wrong_mask = dataclasses.replace(
        evidence, segmentation=Segmentation(mask=np.zeros((10, 10), bool), ok=True)
    )
    with pytest.raises(ValueError, match="mask shape"):
        build_evidence(dms_source, wrong_mask, IDENTITY, CREATED)
    with pytest.raises(TypeError):
        build_evidence(dms_source, evidence, IDENTITY, "2026-01-01")


@pytest.mark.parametrize("kind", ["untrained", "clinical"])
def test_descriptions_fit_and_carry_the_model(dms_source, kind):
    card = make_card(untrained=True) if kind == "untrained" else make_card(demo=False)
    files = read_all(build_evidence(dms_source, make_evidence(card), IDENTITY, CREATED))
    for name, ds in files.items():
        assert len(ds.SeriesDescription) <= 64, name
        if kind == "untrained":
            assert "UNTRAINED" in ds.SeriesDescription and "not for diagnostic use" in ds.SeriesDescription
        else:
            assert "not for diagnostic use" not in ds.SeriesDescription
            assert "dermnode-test-cnn 1.0.0" in ds.SeriesDescription, name
