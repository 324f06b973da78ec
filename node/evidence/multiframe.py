"""The multi-frame image attributes highdicom 0.28 writes for a one-frame SEG or Parametric Map.

One frame on the resized image's grid with the nominal plane geometry of
:func:`node.evidence.image.plane_geometry`: Frame of Reference, Image Pixel,
source references, Multi-frame Dimension and the shared / per-frame functional
groups, as ``highdicom.image._Image._init_multiframe_image`` sets them for a
single-frame source image (checked byte for byte against highdicom by
tests/unit/test_evidence_fastpath.py).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.evidence import codes
from node.evidence.header import code_item
from node.evidence.image import PlaneGeometry, _ds

#: (Dimension Index Pointer, Functional Group Pointer, Dimension Description Label).
POSITION_DIMENSION = ((0x00200032, 0x00209113, "Image Position Patient"),)
SEGMENT_DIMENSION = (0x0062000B, 0x0062000A, "Referenced Segment Number")

_ORIENTATION = [_ds(v) for v in (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)]


def multiframe_image(
    ds: Dataset,
    image: Dataset,
    geometry: PlaneGeometry,
    *,
    bits_allocated: int,
    image_type: list[str],
    derivation,
    dimension_organization_uid: str,
    dimensions: list[tuple[int, int, str]],
    dimension_index_values: list[int] | int,
    float_pixels: bool = False,
    burned_in_annotation: bool | None = None,
    recognizable_visual_features: bool | None = None,
) -> None:
    rows, cols = int(image.Rows), int(image.Columns)
    ds.FrameOfReferenceUID = geometry.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.BitsAllocated = bits_allocated
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if not float_pixels:
        ds.BitsStored = bits_allocated
        ds.HighBit = bits_allocated - 1
        ds.PixelRepresentation = 0
    ds.ImageType = list(image_type)
    if burned_in_annotation is not None:
        ds.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
    if recognizable_visual_features is not None:
        ds.RecognizableVisualFeatures = "YES" if recognizable_visual_features else "NO"
    ds.PresentationLUTShape = "IDENTITY"

    instance = Dataset()
    instance.ReferencedSOPClassUID = image.SOPClassUID
    instance.ReferencedSOPInstanceUID = image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = image.SeriesInstanceUID
    series.ReferencedInstanceSequence = [instance]
    ds.ReferencedSeriesSequence = [series]
    source = Dataset()
    source.ReferencedSOPClassUID = image.SOPClassUID
    source.ReferencedSOPInstanceUID = image.SOPInstanceUID
    ds.SourceImageSequence = [source]

    ds.LossyImageCompression = image.get("LossyImageCompression", "00")
    if ds.LossyImageCompression == "01":
        if "LossyImageCompressionRatio" in image:
            ds.LossyImageCompressionRatio = image.LossyImageCompressionRatio
        if "LossyImageCompressionMethod" in image:
            ds.LossyImageCompressionMethod = image.LossyImageCompressionMethod

    ds.Rows = rows
    ds.Columns = cols
    ds.NumberOfFrames = 1

    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_organization_uid
    ds.DimensionOrganizationSequence = [organization]
    indices = []
    for index_pointer, group_pointer, label in dimensions:
        item = Dataset()
        item.DimensionOrganizationUID = dimension_organization_uid
        item.DimensionIndexPointer = Tag(index_pointer)
        item.FunctionalGroupPointer = Tag(group_pointer)
        item.DimensionDescriptionLabel = label
        indices.append(item)
    ds.DimensionIndexSequence = indices

    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(_ORIENTATION)
    shared.PlaneOrientationSequence = [orientation]
    measures = Dataset()
    measures.SliceThickness = _ds(min(geometry.pixel_spacing))
    measures.PixelSpacing = [_ds(geometry.pixel_spacing[0]), _ds(geometry.pixel_spacing[1])]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]

    frame = Dataset()
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    ref.SpatialLocationsPreserved = "YES"
    ref.PurposeOfReferenceCodeSequence = [code_item(codes.SOURCE_FOR_PROCESSING)]
    derivation_item = Dataset()
    derivation_item.SourceImageSequence = [ref]
    derivation_item.DerivationCodeSequence = [code_item(derivation)]
    frame.DerivationImageSequence = [derivation_item]
    content = Dataset()
    content.DimensionIndexValues = dimension_index_values
    frame.FrameContentSequence = [content]
    position = Dataset()
    position.ImagePositionPatient = ["0", "0", "0"]
    frame.PlanePositionSequence = [position]
    ds.PerFrameFunctionalGroupsSequence = [frame]


def pack_binary(mask: np.ndarray) -> bytes:
    """A BINARY frame: one bit per pixel, little bit order, row by row."""
    return np.packbits(np.asarray(mask, dtype=bool).ravel(), bitorder="little").tobytes()
