"""Codes, SOP classes and fixed numbers used by the evidence builders.

Every code here is either taken from pydicom's code dictionary (PS3.16) or
documented in ``shared/docs/dicom-reference.md``. Keep the choices in one place
so that the conformance statement can point at this module.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.model.card import ClassSpec

# --- SOP classes -----------------------------------------------------------------

DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

#: Source SOP classes the builders accept, with the Modality each one requires.
SOURCE_MODALITY: dict[str, str] = {
    DERMOSCOPIC_PHOTOGRAPHY: "DMS",
    VL_PHOTOGRAPHIC: "XC",
}

#: (Modality) code for the SR image library (TID 1602, CID 29). highdicom 0.28's
#: lookup lacks the Dermoscopic Photography class, so the library is built here.
MODALITY_CODE: dict[str, Code] = {
    DERMOSCOPIC_PHOTOGRAPHY: codes.DCM.Dermoscopy,  # (DMS, DCM, "Dermoscopy")
    VL_PHOTOGRAPHIC: codes.cid29.ExternalCameraPhotography,  # (XC, DCM, ...)
}

# --- output kinds ----------------------------------------------------------------

#: The four derived objects; also the "output kind" part of their UIDs.
KINDS = ("image", "seg", "pmap", "sr")

#: Deterministic Series Number per output kind (one series per kind and source series).
SERIES_NUMBER: dict[str, int] = {"image": 9001, "seg": 9002, "pmap": 9003, "sr": 9004}

# --- codes -----------------------------------------------------------------------

SPATIAL_RESAMPLING = Code("113085", "DCM", "Spatial resampling")  # CID 7203
#: Derivation codes highdicom 0.28 writes for a SEG and a Parametric Map (CID 7203).
SEGMENTATION_DERIVATION = Code("113076", "DCM", "Segmentation")
PMAP_DERIVATION = Code("112187", "DCM", "Unspecified method of calculation")
#: Purpose of reference of the Source Image Sequence item (CID 7202).
SOURCE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
ACQUISITION_EQUIPMENT = codes.DCM.AcquisitionEquipment  # (109101, DCM)

LESION_CATEGORY = Code("49755003", "SCT", "Morphologically abnormal structure")  # CID 7150
LESION_TYPE = Code("52988006", "SCT", "Lesion")  # CID 7151

QUANTITY = Code("246205007", "SCT", "Quantity")
GRAD_CAM = Code("130403", "DCM", "Gradient-weighted class activation")  # CID 217
NO_UNITS = Code("1", "UCUM", "no units")  # CID 7181

VISUAL_EXPLANATION = Code("130401", "DCM", "Visual explanation")
PROBABILITY = Code("122157", "DCM", "Probability")
FINDING = Code("121071", "DCM", "Finding")
COMMENT = Code("121106", "DCM", "Comment")
#: Procedure reported (TID 1500 row 4, DCID 100). (446078004, SCT, "Dermoscopic
#: photography") would be more specific, but it is not in CID 100 and PixelMed's
#: DicomSRValidator rejects it; the dermoscopy is stated by the image library's
#: Modality (DMS) instead.
PROCEDURE_REPORTED = codes.SCT.ImagingProcedure  # (363679005, SCT, "Imaging procedure")
#: TID 1500 row 12: container of free-text notices (row 14: TEXT).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

#: CID 244 Laterality, keyed by Image Laterality / Laterality values.
LATERALITY: dict[str, Code] = {
    "R": Code("24028007", "SCT", "Right"),
    "L": Code("7771000", "SCT", "Left"),
    "B": Code("51440002", "SCT", "Bilateral"),
}


def class_code(spec: ClassSpec) -> Code:
    """The SNOMED CT finding code of a model class (from the model card)."""
    return Code(spec.snomed, "SCT", spec.snomed_meaning)


def code_from_item(item: Dataset) -> Code:
    """A pydicom Code from a Code Sequence item (Code Value or Long/URN Code Value)."""
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    if not value:
        raise ValueError("code sequence item has no Code Value")
    return Code(
        str(value),
        str(item.CodingSchemeDesignator),
        str(item.get("CodeMeaning", "")),
        scheme_version=item.get("CodingSchemeVersion"),
    )
