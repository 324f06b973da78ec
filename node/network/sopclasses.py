"""SOP classes and transfer syntaxes the node accepts and sends (the conformance tables)."""

from __future__ import annotations

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

DERMOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
VERIFICATION = "1.2.840.10008.1.1"

#: Classes the node itself produces (besides the resized image, which keeps the input's class).
#: They are accepted as SCP so that a PACS routing everything back gets success, and are ignored.
OUTPUT_ONLY_CLASSES = (SEGMENTATION, PARAMETRIC_MAP, COMPREHENSIVE_3D_SR)

NAMES = {
    DERMOSCOPIC: "Dermoscopic Photography Image Storage",
    VL_PHOTOGRAPHIC: "VL Photographic Image Storage",
    SEGMENTATION: "Segmentation Storage",
    PARAMETRIC_MAP: "Parametric Map Storage",
    COMPREHENSIVE_3D_SR: "Comprehensive 3D SR Storage",
    VERIFICATION: "Verification",
}

#: Transfer syntaxes accepted for input images, in order of preference.
INPUT_TRANSFER_SYNTAXES = [
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    str(DeflatedExplicitVRLittleEndian),
    str(JPEGBaseline8Bit),
    str(JPEGExtended12Bit),
    str(JPEGLossless),
    str(JPEGLosslessSV1),
    str(JPEGLSLossless),
    str(JPEGLSNearLossless),
    str(JPEG2000Lossless),
    str(JPEG2000),
    str(RLELossless),
]

#: Transfer syntaxes accepted for the ignored output classes (they are never decoded).
OUTPUT_CLASS_TRANSFER_SYNTAXES = [
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    str(DeflatedExplicitVRLittleEndian),
    str(RLELossless),
    str(JPEG2000Lossless),
]

#: Transfer syntaxes proposed when sending the derived objects (all written uncompressed).
SEND_TRANSFER_SYNTAXES = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
