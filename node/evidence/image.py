"""The resized image: the exact model input, as a derived instance of the source's SOP class.

The output is a Dermoscopic Photography (or VL Photographic) instance, like its
source, with ImageType ``DERIVED\\SECONDARY``, uncompressed RGB pixels (Explicit
VR Little Endian, PlanarConfiguration 0), a Source Image Sequence pointing at the
source, Derivation Code (113085, DCM, "Spatial resampling") and a Derivation
Description of the crop and resize.

The SEG and the Parametric Map are drawn on this image's pixel grid. Because a
photograph has no patient geometry, this module also defines the *nominal*
image-plane geometry of that grid (:func:`geometry_source`): origin at the
centre of the top-left pixel, rows along +X, columns along +Y, in a frame of
reference of its own (:func:`node.evidence.uids.frame_of_reference_uid`). The
pixel spacing is the source's, rescaled by the resize factor, where the source
declares one; otherwise it is a nominal 1 mm, said so in the objects.

Also here: small helpers the other builders share (equipment, patient/study
copy, date/time, length-limited descriptions).
"""

from __future__ import annotations

import copy
import datetime as _dt
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, UID
from pydicom.valuerep import format_number_as_ds

from node.evidence import codes, uids
from node.evidence.identity import NodeIdentity
from node.model.card import ModelCard
from node.pipeline.result import Evidence

KIND = "image"

# --- attributes copied verbatim from the source ------------------------------------

#: Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial
#: Study module attributes (the IEs every derived object shares with its source).
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "QualityControlSubject", "OtherPatientIDsSequence", "OtherPatientNames",
    "EthnicGroup", "EthnicGroupCodeSequence", "PatientComments",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
    "StrainDescription", "StrainNomenclature", "StrainCodeSequence",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "ReferencedPatientPhotoSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "RequestingServiceCodeSequence",
    "ReferencedStudySequence", "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge",
    "PatientSize", "PatientWeight", "PatientBodyMassIndex", "MeasuredAPDimension",
    "MeasuredLateralDimension", "PatientSizeCodeSequence", "MedicalAlerts", "Allergies",
    "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "PatientState", "Occupation",
    "AdditionalPatientHistory", "AdmissionID", "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID", "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence",
    "PatientSexNeutered", "ReasonForVisit", "ReasonForVisitCodeSequence",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    "ConsentForClinicalTrialUseSequence",
)

#: Type 2 patient/study attributes: present (possibly empty) in every output.
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)

#: Dermoscopic Image module (C.8.12.13): (keyword, type).
_DERMOSCOPIC_IMAGE = (
    ("LightSourcePolarization", "2"),
    ("EmitterColorTemperature", "2"),
    ("ContactMethod", "2"),
    ("ImmersionMedia", "2C"),
    ("OpticalMagnificationFactor", "2"),
    ("PartialView", "3"),
    ("PartialViewDescription", "3"),
    ("TrackingID", "1C"),
    ("TrackingUID", "1C"),
)

#: Anatomy and view of the photographed site (VL Image / General Series).
_ANATOMY = (
    "AnatomicRegionSequence", "PrimaryAnatomicStructureSequence", "ImageLaterality",
    "ViewCodeSequence", "BodyPartExamined", "Laterality",
)

_ACQUISITION = ("AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "AcquisitionNumber")

#: Source transfer syntaxes that are lossy (the model saw decompressed lossy pixels).
_LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102",
    "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105",
    "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.112",
    "1.2.840.10008.1.2.4.203",
}

_IDENTITY_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Spacing (mm) used for the nominal plane geometry when the source declares none.
NOMINAL_SPACING_MM = 1.0


# --- small shared helpers -----------------------------------------------------------


def check_source(source: Dataset) -> None:
    """Raise ValueError unless ``source`` is a usable Dermoscopic/VL Photographic instance."""
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, not {type(source).__name__}")
    sop_class = str(source.get("SOPClassUID", ""))
    if sop_class not in codes.SOURCE_MODALITY:
        raise ValueError(
            "source must be a Dermoscopic Photography or VL Photographic image, "
            f"got SOP Class UID {sop_class!r}"
        )
    for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not source.get(kw):
            raise ValueError(f"source has no {kw}")


def dicom_date(when: _dt.datetime) -> str:
    return when.strftime("%Y%m%d")


def dicom_time(when: _dt.datetime) -> str:
    return when.strftime("%H%M%S.%f") if when.microsecond else when.strftime("%H%M%S")


def dicom_datetime(when: _dt.datetime) -> str:
    return dicom_date(when) + dicom_time(when)


def timezone_offset(when: _dt.datetime) -> str | None:
    """``&ZZXX`` for TimezoneOffsetFromUTC, or None for a naive datetime."""
    off = when.utcoffset()
    if off is None:
        return None
    minutes = int(off.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def fit(limit: int, *candidates: str) -> str:
    """The first candidate of at most ``limit`` characters (else the last, cut)."""
    for c in candidates:
        if len(c) <= limit:
            return c
    return candidates[-1][:limit]


def short_label(card: ModelCard) -> str:
    """A shorter :attr:`ModelCard.label` for 64-character (LO) descriptions."""
    if card.model.untrained:
        return "UNTRAINED, not for diagnostic use"
    if card.model.demo:
        return "demo, not for diagnostic use"
    return f"{card.model.name} {card.model.version}"


def describe(prefix: str, card: ModelCard, limit: int = 64) -> str:
    """``"<prefix> (<card.label>)"`` fitted into an LO value."""
    return fit(limit, f"{prefix} ({card.label})", f"{prefix} ({short_label(card)})")


def model_text(card: ModelCard) -> str:
    """``"<name> <version>"`` plus the not-for-diagnostic-use notice where it applies."""
    text = f"{card.model.name} {card.model.version}"
    if card.model.untrained or card.model.demo:
        text += f" ({card.label})"
    return text


def software_versions(identity: NodeIdentity, card: ModelCard) -> list[str]:
    """SoftwareVersions: the node's version and the model's name + version."""
    return [
        fit(64, f"dermnode {identity.software_version}"),
        fit(64, f"{card.model.name} {card.model.version}"),
    ]


def copy_attributes(target: Dataset, source: Dataset, keywords) -> None:
    """Copy the listed attributes present in ``source``; sequences are deep-copied."""
    for kw in keywords:
        if kw in source:
            elem = source[kw]
            if elem.VR == "SQ":
                target.add(DataElement(elem.tag, "SQ", copy.deepcopy(elem.value)))
            else:
                target.add(DataElement(elem.tag, elem.VR, elem.value))


def copy_patient_study(target: Dataset, source: Dataset) -> None:
    """Patient and study attributes of ``source`` (type 2 ones present, maybe empty)."""
    copy_attributes(target, source, PATIENT_STUDY_KEYWORDS)
    for kw in _TYPE2_PATIENT_STUDY:
        if kw not in target:
            setattr(target, kw, None)


def acquisition_equipment(source: Dataset) -> Dataset | None:
    """ContributingEquipmentSequence item for the dermoscope that took ``source``.

    None when the source does not name its manufacturer (type 1 in the item).
    """
    manufacturer = source.get("Manufacturer")
    if not manufacturer:
        return None
    item = Dataset()
    item.Manufacturer = manufacturer
    item.PurposeOfReferenceCodeSequence = [_code_item(codes.ACQUISITION_EQUIPMENT)]
    for kw in ("InstitutionName", "InstitutionAddress", "StationName",
               "InstitutionalDepartmentName", "ManufacturerModelName",
               "DeviceSerialNumber", "SoftwareVersions"):
        value = source.get(kw)
        if value:
            setattr(item, kw, value)
    when = source.get("AcquisitionDateTime")
    if when:
        item.ContributionDateTime = when
    item.ContributionDescription = "Acquisition equipment of the source image"
    return item


def set_contributing_equipment(ds: Dataset, source: Dataset, created: _dt.datetime) -> None:
    """Replace highdicom's default ContributingEquipmentSequence by a deterministic one.

    highdicom lists the equipment of its first source image (here: the node
    itself, via the resized image) and itself with ``datetime.now()``. Keep the
    dermoscope (from the original source) and the highdicom item, time-stamped
    with ``created``.
    """
    items = []
    dermoscope = acquisition_equipment(source)
    if dermoscope is not None:
        items.append(dermoscope)
    for item in ds.get("ContributingEquipmentSequence", []):
        purpose = item.get("PurposeOfReferenceCodeSequence")
        if purpose and purpose[0].get("CodeValue") == codes.ACQUISITION_EQUIPMENT.value:
            continue  # highdicom's guess at acquisition equipment: the node, not the dermoscope
        if "ContributionDateTime" in item:
            item.ContributionDateTime = dicom_datetime(created)
        items.append(item)
    if items:
        ds.ContributingEquipmentSequence = items
    elif "ContributingEquipmentSequence" in ds:
        del ds.ContributingEquipmentSequence


def stamp(ds: Dataset, created: _dt.datetime) -> None:
    """Instance creation and series date/time from ``created`` (determinism)."""
    ds.InstanceCreationDate = dicom_date(created)
    ds.InstanceCreationTime = dicom_time(created)
    ds.SeriesDate = dicom_date(created)
    ds.SeriesTime = dicom_time(created)
    tz = timezone_offset(created)
    if tz is not None:
        ds.TimezoneOffsetFromUTC = tz


def _code_item(code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def image_laterality(source: Dataset) -> str | None:
    """R, L, B or U from ImageLaterality, else from the series Laterality; None if unknown."""
    for kw in ("ImageLaterality", "Laterality"):
        value = str(source.get(kw, "") or "").strip().upper()
        if value in ("R", "L", "B", "U"):
            return value
    return None


def source_spacing(source: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm declared by the source, or None."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = source.get(kw)
        if value is not None and len(value) == 2:
            try:
                row, col = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
                return row, col
    return None


def resized_spacing(source: Dataset, evidence: Evidence) -> tuple[float, float] | None:
    """Source spacing times (crop side / model-input side), per axis; None if unknown."""
    spacing = source_spacing(source)
    if spacing is None:
        return None
    rows, cols = evidence.model_input.shape[:2]
    crop = evidence.crop
    return spacing[0] * crop.height / rows, spacing[1] * crop.width / cols


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def metadata_copy(ds: Dataset) -> Dataset:
    """Copy of ``ds`` without pixel data, with new data elements (sequences deep-copied).

    highdicom adds the data element objects of its source datasets to the new
    object; handing it a copy keeps the outputs from sharing (mutable) elements
    with the caller's source or with each other.
    """
    out = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0:  # (Float/Double Float) Pixel Data
            continue
        if elem.VR == "SQ":
            out.add(DataElement(elem.tag, "SQ", copy.deepcopy(elem.value)))
        else:
            out.add(DataElement(elem.tag, elem.VR, elem.value))
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    return out


# --- nominal image-plane geometry ---------------------------------------------------


@dataclass(frozen=True)
class PlaneGeometry:
    """The nominal image plane of the model-input grid, shared by SEG and Parametric Map."""

    frame_of_reference_uid: str
    #: (row, column) spacing in mm.
    pixel_spacing: tuple[float, float]
    #: True when the spacing comes from the source's calibration, False when nominal.
    calibrated: bool


def plane_geometry(source: Dataset, evidence: Evidence) -> PlaneGeometry:
    spacing = resized_spacing(source, evidence)
    return PlaneGeometry(
        frame_of_reference_uid=uids.frame_of_reference_uid(source, evidence.card),
        pixel_spacing=spacing or (NOMINAL_SPACING_MM, NOMINAL_SPACING_MM),
        calibrated=spacing is not None,
    )


def geometry_source(image: Dataset, geometry: PlaneGeometry) -> Dataset:
    """Metadata-only view of the resized ``image`` with the nominal plane geometry.

    highdicom 0.28 derives a SEG's / Parametric Map's Frame of Reference, Pixel
    Measures and Plane Position/Orientation from its source image and fails
    (Parametric Map) or omits them (SEG) for a photograph. This view, passed
    as the source image, carries the same identifying attributes (UIDs, SOP
    class, patient/study, rows/columns) as the resized image plus that
    geometry; the pixel data are not needed. The resized image itself is
    unchanged (its IOD has no Image Plane module).
    """
    view = metadata_copy(image)
    view.FrameOfReferenceUID = geometry.frame_of_reference_uid
    view.PositionReferenceIndicator = ""
    view.ImagePositionPatient = ["0", "0", "0"]
    view.ImageOrientationPatient = [_ds(v) for v in _IDENTITY_ORIENTATION]
    view.PixelSpacing = [_ds(geometry.pixel_spacing[0]), _ds(geometry.pixel_spacing[1])]
    view.SliceThickness = _ds(min(geometry.pixel_spacing))
    return view


# --- the resized image --------------------------------------------------------------


def _check_model_input(evidence: Evidence) -> np.ndarray:
    arr = evidence.model_input
    if not isinstance(arr, np.ndarray):
        raise TypeError("evidence.model_input must be a numpy array")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"evidence.model_input must be rows x cols x 3, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"evidence.model_input must be uint8, got {arr.dtype}")
    return arr


def derivation_description(source: Dataset, evidence: Evidence) -> str:
    crop = evidence.crop
    rows, cols = evidence.model_input.shape[:2]
    src_rows = int(source.get("Rows") or evidence.source_shape[0] or 0)
    src_cols = int(source.get("Columns") or evidence.source_shape[1] or 0)
    text = (
        f"Model input of {model_text(evidence.card)}: {crop.method} of source columns "
        f"{crop.x0}..{crop.x1 - 1}, rows {crop.y0}..{crop.y1 - 1} "
        f"({crop.width}x{crop.height} of {src_cols}x{src_rows} pixels"
        f"{', padded with the edge colour' if crop.padded else ''}), "
        f"resampled to {cols}x{rows}."
    )
    return text[:1024]


def build_image(
    source: Dataset, evidence: Evidence, identity: NodeIdentity, created: _dt.datetime
) -> Dataset:
    """The model input (``evidence.model_input``) as a derived image of the source's SOP class."""
    check_source(source)
    pixels = _check_model_input(evidence)
    card = evidence.card
    rows, cols = pixels.shape[:2]
    sop_class = str(source.SOPClassUID)
    is_dms = sop_class == codes.DERMOSCOPIC_PHOTOGRAPHY
    sop_uid = uids.instance_uid(source, card, KIND)

    ds = Dataset()
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet

    # SOP Common
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    stamp(ds, created)
    dermoscope = acquisition_equipment(source)
    if dermoscope is not None:
        ds.ContributingEquipmentSequence = [dermoscope]

    # Patient, Study
    copy_patient_study(ds, source)

    # General Series
    ds.Modality = codes.SOURCE_MODALITY[sop_class]
    ds.SeriesInstanceUID = uids.series_uid(source, card, KIND)
    ds.SeriesNumber = codes.SERIES_NUMBER[KIND]
    ds.SeriesDescription = describe(f"AI model input {cols}x{rows}", card)

    # General / Enhanced General Equipment: the node itself
    ds.Manufacturer = identity.manufacturer
    ds.ManufacturerModelName = identity.model_name
    ds.DeviceSerialNumber = identity.device_serial_number
    ds.SoftwareVersions = software_versions(identity, card)
    if identity.institution_name:
        ds.InstitutionName = identity.institution_name
    if identity.station_name:
        ds.StationName = identity.station_name

    # Frame of Reference: in the DMS IOD (and required by dciodvfy), not in VL Photographic
    if is_dms:
        ds.FrameOfReferenceUID = uids.frame_of_reference_uid(source, card)
        ds.PositionReferenceIndicator = ""

    # General Acquisition: the acquisition of the photographed lesion
    copy_attributes(ds, source, _ACQUISITION)

    # General Image / VL Image
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ContentDate = dicom_date(created)
    ds.ContentTime = dicom_time(created)
    ds.PatientOrientation = source.get("PatientOrientation", "") or ""
    ds.ImageComments = (
        f"Input of the AI model {model_text(card)}, "
        f"as classified; derived by {identity.model_name} {identity.software_version}."
    )[:10240]
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = str(source.get("RecognizableVisualFeatures") or "YES")
    lossy = str(source.get("LossyImageCompression", "") or "")
    tsyntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    if lossy == "01" or tsyntax in _LOSSY_TRANSFER_SYNTAXES:
        ds.LossyImageCompression = "01"
        copy_attributes(ds, source, ("LossyImageCompressionRatio", "LossyImageCompressionMethod"))
    else:
        ds.LossyImageCompression = "00"

    src_item = Dataset()
    src_item.ReferencedSOPClassUID = sop_class
    src_item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    src_item.PurposeOfReferenceCodeSequence = [
        _code_item(codes.SOURCE_FOR_PROCESSING)
    ]
    ds.SourceImageSequence = [src_item]
    ds.DerivationDescription = derivation_description(source, evidence)
    ds.DerivationCodeSequence = [_code_item(codes.SPATIAL_RESAMPLING)]

    copy_attributes(ds, source, _ANATOMY)
    spacing = resized_spacing(source, evidence)
    if spacing is not None:
        ds.PixelSpacing = [_ds(spacing[0]), _ds(spacing[1])]

    # Acquisition Context (type 2)
    if "AcquisitionContextSequence" in source:
        copy_attributes(ds, source, ("AcquisitionContextSequence",))
    else:
        ds.AcquisitionContextSequence = DicomSequence()

    # Dermoscopic Image
    if is_dms:
        for kw, typ in _DERMOSCOPIC_IMAGE:
            if kw in source:
                copy_attributes(ds, source, (kw,))
            elif typ == "2" or (kw == "ImmersionMedia" and source.get("ContactMethod") == "CONTACT"):
                setattr(ds, kw, None)

    # Image Pixel
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.add(DataElement(0x7FE00010, "OB", np.ascontiguousarray(pixels).tobytes()))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds
