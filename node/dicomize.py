"""Wrap a dermoscopy JPEG into a DICOM instance, the way a dermoscope sends it.

The original JPEG bytes are encapsulated untouched as JPEG Baseline
(1.2.840.10008.1.2.4.50), with PhotometricInterpretation YBR_FULL_422 when the
stream is 4:2:0/4:2:2 subsampled YCbCr (as most cameras write it). Used by the
tests, the benchmark and ``dermnode demo`` to make realistic inputs from the
CC0 fixtures; it is not part of the node's data path.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from pathlib import Path

from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID

DERMOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"

# A few CID 4029 "Dermatology Anatomic Site" entries, keyed by a short name.
SITES = {
    "back": ("77568009", "Back", True),
    "chest": ("43799004", "Thorax", False),
    "arm": ("302538001", "Upper arm", True),
    "thigh": ("68367000", "Thigh", True),
    "face": ("89545001", "Face", False),
    "abdomen": ("818983003", "Abdomen", False),
}


def _uid(*parts: str) -> str:
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "dermnode-dicomize|" + "|".join(parts)).int)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning
    return c


def _jpeg_info(data: bytes) -> tuple[int, int, int, str]:
    with Image.open(__import__("io").BytesIO(data)) as im:
        if im.format != "JPEG":
            raise ValueError("not a JPEG file")
        if im.mode not in ("RGB", "L"):
            raise ValueError(f"unsupported JPEG mode {im.mode}")
        samples = 3 if im.mode == "RGB" else 1
        w, h = im.size
        # Pillow reports subsampling as 0 (4:4:4), 1 (4:2:2), 2 (4:2:0).
        from PIL import JpegImagePlugin

        sub = JpegImagePlugin.get_sampling(im) if samples == 3 else -1
    if samples == 1:
        photometric = "MONOCHROME2"
    elif sub in (1, 2):
        photometric = "YBR_FULL_422"
    else:
        photometric = "YBR_FULL"
    return h, w, samples, photometric


def wrap_jpeg(
    path: str | Path,
    *,
    patient_name: str = "Doe^Jane",
    patient_id: str = "DERM0001",
    patient_sex: str | None = None,
    patient_age: int | None = None,
    patient_birth_date: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    sop_class: str = "dermoscopic",
    laterality: str | None = None,
    site: str | None = "back",
    accession: str = "",
    tracking_id: str | None = None,
    character_set: str | None = None,
    when: _dt.datetime | None = None,
) -> Dataset:
    """Return a Dermoscopic Photography (or VL Photographic) instance for a JPEG file.

    UIDs default to values derived from the file name, so the same call gives
    the same instance.
    """
    p = Path(path)
    data = p.read_bytes()
    rows, cols, samples, photometric = _jpeg_info(data)
    key = p.name + "|" + patient_id
    when = when or _dt.datetime(2026, 1, 15, 10, 30, 0)
    cls_uid = DERMOSCOPIC if sop_class == "dermoscopic" else VL_PHOTOGRAPHIC
    if sop_class not in ("dermoscopic", "vl-photographic"):
        raise ValueError(f"sop_class must be 'dermoscopic' or 'vl-photographic', not {sop_class!r}")

    ds = Dataset()
    if character_set:
        ds.SpecificCharacterSet = character_set
    ds.SOPClassUID = cls_uid
    ds.SOPInstanceUID = sop_uid or _uid("sop", key)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.AccessionNumber = accession
    ds.Modality = "DMS" if cls_uid == DERMOSCOPIC else "XC"
    ds.Manufacturer = "DermLite"
    ds.ManufacturerModelName = "DL5 (simulated)"
    ds.DeviceSerialNumber = "SIM-0001"
    ds.SoftwareVersions = "1.0"
    ds.InstitutionName = "Example Dermatology Clinic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Dermoscopy"
    ds.SeriesDescription = "Dermoscopy " + (site or "lesion")
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex or ""
    if patient_age is not None:
        ds.PatientAge = f"{int(patient_age):03d}Y"
    ds.StudyInstanceUID = study_uid or _uid("study", patient_id)
    ds.SeriesInstanceUID = series_uid or _uid("series", key)
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if cls_uid == DERMOSCOPIC:  # the DMS IOD includes Frame of Reference; VL Photographic does not
        ds.FrameOfReferenceUID = _uid("for", key)
        ds.PositionReferenceIndicator = ""
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{(rows * cols * samples) / max(1, len(data)):.2f}"[:16]
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.AcquisitionContextSequence = Sequence()
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if cls_uid == DERMOSCOPIC:
        ds.LightSourcePolarization = "POLARIZED"
        ds.ContactMethod = "NON_CONTACT"
        ds.EmitterColorTemperature = 4500
        ds.OpticalMagnificationFactor = 10
        ds.PartialView = "NO"
    if tracking_id:
        ds.TrackingID = tracking_id
        ds.TrackingUID = _uid("tracking", tracking_id)
    if site:
        value, meaning, paired = SITES[site]
        ds.AnatomicRegionSequence = Sequence([_code(value, "SCT", meaning)])
        if paired:
            ds.ImageLaterality = laterality or "R"
        else:
            ds.ImageLaterality = laterality or "U"
    elif laterality:
        ds.ImageLaterality = laterality
    ds.PixelData = encapsulate([data])
    ds["PixelData"].VR = "OB"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds
