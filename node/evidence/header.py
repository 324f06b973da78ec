"""Direct construction of the attributes highdicom 0.28 gives every SOP instance it creates.

The SEG, Parametric Map and SR builders set their objects up without
highdicom's constructors (see ``build_seg``, ``build_pmap``, ``build_sr``):
those validate a general case at every call (IOD module tables scanned for
each attribute, deep copies of every input), ~10 ms an object, for an outcome
that is fixed for these three documents. This module is the part they share:
the SOP Common / Patient / Study / Series / Equipment attributes exactly as
``highdicom.base.SOPClass`` writes them from a source image, then the
deterministic stamps of :mod:`node.evidence.image`. Each builder's output is
compared byte for byte with its highdicom ``reference_build_*`` by
tests/unit/test_evidence_fastpath.py.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools

import highdicom as hd
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from highdicom.valuerep import _check_specific_character_set
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from node.evidence.identity import NodeIdentity
from node.evidence.image import dicom_date, dicom_time, set_contributing_equipment, software_versions, stamp
from node.model.card import ModelCard

#: highdicom's Implementation Class UID and Version Name (its file meta; the objects
#: are byte-identical to highdicom's, and say so).
HIGHDICOM_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"
HIGHDICOM_VERSION_NAME = f"highdicom{hd.__version__}"


@functools.lru_cache(maxsize=None)
def patient_study_tags(sop_class_uid: str) -> tuple[int, ...]:
    """Root attributes of the Patient and Study IE modules of an IOD (what highdicom copies)."""
    iod = get_sop_class_iod_map()[sop_class_uid]
    attributes = get_module_attribute_map()
    tags = []
    for ie in ("Patient", "Study"):
        for module in get_iod_module_map()[iod]:
            if module["ie"] != ie:
                continue
            for item in attributes[module["key"]]:
                if len(item["path"]) == 0:
                    tag = tag_for_keyword(str(item["keyword"]))
                    if tag is not None:
                        tags.append(tag)
    return tuple(dict.fromkeys(tags))


@functools.lru_cache(maxsize=1)
def _highdicom_equipment() -> Dataset:
    return hd.ContributingEquipment.for_highdicom()


def copy_element(target: Dataset, elem) -> None:
    """Add a copy of ``elem`` (sequences deep-copied) to ``target``."""
    if elem.VR == "SQ":
        target.add(DataElement(elem.tag, "SQ", copy.deepcopy(elem.value)))
    else:
        target.add(DataElement(elem.tag, elem.VR, elem.value))


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = UID(HIGHDICOM_IMPLEMENTATION_UID)
    meta.ImplementationVersionName = HIGHDICOM_VERSION_NAME
    return meta


def sop_instance(
    src: Dataset,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    modality: str,
    series_description: str,
    identity: NodeIdentity,
    card: ModelCard,
    created: _dt.datetime,
) -> Dataset:
    """A new instance with highdicom's SOPClass attributes, patient/study taken from ``src``.

    ``src`` plays highdicom's first source image (or SR evidence); missing type 2
    patient/study attributes raise AttributeError as they do in highdicom.
    """
    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = file_meta(sop_class_uid, sop_instance_uid)
    ds.PatientID = src.PatientID
    ds.PatientName = src.PatientName
    ds.PatientBirthDate = src.PatientBirthDate
    ds.PatientSex = src.PatientSex
    ds.StudyInstanceUID = str(src.StudyInstanceUID)
    ds.AccessionNumber = src.AccessionNumber
    ds.StudyID = src.StudyID
    ds.StudyDate = src.StudyDate
    ds.StudyTime = src.StudyTime
    ds.ReferringPhysicianName = src.get("ReferringPhysicianName", None)
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.Manufacturer = identity.manufacturer
    ds.ManufacturerModelName = identity.model_name
    ds.DeviceSerialNumber = identity.device_serial_number
    ds.SoftwareVersions = software_versions(identity, card)
    if identity.institution_name is not None:
        ds.InstitutionName = identity.institution_name
    ds.SOPInstanceUID = sop_instance_uid
    ds.SOPClassUID = sop_class_uid
    ds.InstanceNumber = 1
    charset = src.get("SpecificCharacterSet")
    if charset is not None:
        ds.SpecificCharacterSet = _check_specific_character_set(charset)
    ds.ContentDate = dicom_date(created)
    ds.ContentTime = dicom_time(created)
    return ds


def finish_instance(ds: Dataset, src: Dataset, source: Dataset, created: _dt.datetime) -> None:
    """Patient/study copied from ``src``, contributing equipment, deterministic stamps."""
    for tag in patient_study_tags(str(src.SOPClassUID)):
        if tag in src:
            copy_element(ds, src[tag])
    ds.ContributingEquipmentSequence = [copy.deepcopy(_highdicom_equipment())]
    stamp(ds, created)
    set_contributing_equipment(ds, source, created)


def code_item(code) -> Dataset:
    """A Code Sequence item as highdicom's CodedConcept writes it (for a Code or a CodedConcept)."""
    value, meaning = str(code.value), str(code.meaning)
    if len(meaning) > 64:
        raise ValueError("Code meaning can have maximally 64 characters.")
    item = Dataset()
    if len(value) > 16:
        if value.startswith("urn") or "://" in value:
            item.URNCodeValue = value
        else:
            item.LongCodeValue = value
    else:
        item.CodeValue = value
    item.CodeMeaning = meaning
    item.CodingSchemeDesignator = str(code.scheme_designator)
    if code.scheme_version is not None:
        item.CodingSchemeVersion = str(code.scheme_version)
    return item
