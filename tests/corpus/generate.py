"""A generated corpus of bad or odd dermoscopy datasets, each with its required outcome.

Run ``python -m tests.corpus.generate OUTDIR`` to write the files (and ``expected.json``);
the tests call :func:`build` directly. Nothing here is a hand-kept binary: every case is
made from a CC0 fixture image by code, so what each case is stays readable.

Outcomes over the network (``net``):

- ``processed``: 0x0000, the job ends ``done`` and exactly 4 results reach the sink;
- ``0xA900`` / ``0xC000``: that failure status, and no job;
- ``dead``: 0x0000 (stored durably first), then the job is dead-lettered with a reason;
- ``ignored``: 0x0000, and no job (the node's own results);
- ``no-context``: the transfer syntax is not accepted at association negotiation.

Offline (``offline``): ``ok`` (4 objects written) or ``fail`` (a per-file reason, exit 1).
"""

from __future__ import annotations

import io
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "data" / "fixtures"
DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL = "1.2.840.10008.5.1.4.1.1.77.1.4"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes  # a complete DICOM file (preamble, file meta, dataset), possibly malformed
    net: str
    offline: str
    why: str


def _base(i: int) -> Dataset:
    from node.dicomize import wrap_jpeg

    ds = wrap_jpeg(FIXTURES / "images" / "ISIC_0000552.jpg", patient_name="Corpus^Case", patient_id="CORPUS01")
    ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{i}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _rgb() -> np.ndarray:
    with Image.open(FIXTURES / "images" / "ISIC_0000552.jpg") as im:
        return np.asarray(im.convert("RGB").resize((240, 200)))


def _native(ds: Dataset, arr: np.ndarray, photometric: str = "RGB", ts=ExplicitVRLittleEndian) -> Dataset:
    """Replace the pixel data with a native array."""
    ds.file_meta.TransferSyntaxUID = ts
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 1 if arr.ndim == 2 else arr.shape[2]
    ds.PhotometricInterpretation = photometric
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    for k in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if k in ds:
            delattr(ds, k)
    ds.LossyImageCompression = "00"
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds


def _bytes(ds: Dataset, *, implicit: bool | None = None) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _raw_file(ds: Dataset, body: bytes) -> bytes:
    """File meta of ``ds`` + an arbitrary (possibly malformed) Explicit VR LE dataset body."""
    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO

    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + body


def _explicit_body(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="JPEG", **kw)
    return b.getvalue()


def _set_jpeg(ds: Dataset, stream: bytes, rows: int, cols: int) -> Dataset:
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.Rows, ds.Columns = rows, cols
    return ds


def _sof_dims(stream: bytes, rows: int, cols: int) -> bytes:
    """Rewrite the first SOF0 frame header's dimensions (a 'JPEG bomb' behind a small header)."""
    i = min(stream.find(m) for m in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2") if stream.find(m) >= 0)
    return stream[: i + 5] + struct.pack(">HH", rows, cols) + stream[i + 9:]


def build() -> list[Case]:
    cases: list[Case] = []
    add = lambda name, data, net, offline, why: cases.append(Case(name, data, net, offline, why))  # noqa: E731
    n = iter(range(1, 1000))
    rgb = _rgb()

    # -- valid and odd-but-valid ------------------------------------------------------------
    add("valid-jpeg-baseline", _bytes(_base(next(n))), "processed", "ok", "control: the fixture as a dermoscope sends it")
    ds = _native(_base(next(n)), (rgb.astype(np.uint16) * 257))
    add("rgb-16bit", _bytes(ds), "processed", "ok", "16-bit RGB is scaled to 8 bits")
    ds = _native(_base(next(n)), rgb.mean(axis=2).astype(np.uint8), "MONOCHROME2")
    add("monochrome2-dermoscopy", _bytes(ds), "processed", "ok", "grey dermoscopy is replicated to 3 channels")
    ds = _native(_base(next(n)), rgb)
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    add("planar-configuration-1", _bytes(ds), "processed", "ok", "colour-by-plane RGB")
    ds = _native(_base(next(n)), (rgb // 32).astype(np.uint8)[..., 0] * 0 + np.arange(rgb.shape[1], dtype=np.uint8)[None, :] % 8, "PALETTE COLOR")
    lut = (np.linspace(0, 65535, 8)).astype(np.uint16)
    for c, col in zip(("Red", "Green", "Blue"), (lut, lut[::-1], lut)):
        setattr(ds, f"{c}PaletteColorLookupTableDescriptor", [8, 0, 16])
        setattr(ds, f"{c}PaletteColorLookupTableData", col.tobytes())
    add("palette-colour", _bytes(ds), "processed", "ok", "PALETTE COLOR through its LUTs")
    ds = _base(next(n))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Zoë=山田^太郎"
    add("charset-iso-ir-192", _bytes(ds), "processed", "ok", "UTF-8 patient name")
    ds = _base(next(n))
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    add("charset-iso-2022-ir-87", _bytes(ds), "processed", "ok", "JIS X 0208 with ISO 2022 escapes")
    ds = _base(next(n))
    ds.SpecificCharacterSet = "ISO_IR 192"
    body = _explicit_body(ds).replace(b"Corpus^Case", b"Corp\xff\xfes^Cas")
    add("invalid-utf8-in-pn", _raw_file(ds, body), "processed", "ok", "bytes that are not UTF-8 in a PN declared UTF-8")
    ds = _base(next(n))
    ds.add_new(0x00091010, "LO", "DERMNODE TEST")
    ds.add_new(0x00091000, "LO", "CORPUS")
    ds.add_new(0x00091001, "OB", b"\x5a" * (8 * 2**20))
    add("huge-private-tag", _bytes(ds), "processed", "ok", "an 8 MiB private OB element")
    ds = _base(next(n))
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "leaf"
    for _ in range(64):
        outer = Dataset()
        outer.ConceptNameCodeSequence = Sequence([inner])
        inner = outer
    ds.AcquisitionContextSequence = Sequence([inner])
    add("deeply-nested-sequences", _bytes(ds), "processed", "ok", "64 levels of nested sequences")
    ds = _native(_base(next(n)), rgb[:1, :1].copy())
    add("image-1x1", _bytes(ds), "processed", "ok", "1x1 pixel: processed, segmentation failure recorded")
    big = np.asarray(Image.fromarray(rgb).resize((8000, 6000), Image.Resampling.NEAREST))
    ds = _set_jpeg(_base(next(n)), _jpeg(big, quality=70), 6000, 8000)
    add("image-8000x6000", _bytes(ds), "processed", "ok", "48 MP JPEG, under the 60 MP default limit")
    ds = _native(_base(next(n)), rgb, ts=ImplicitVRLittleEndian)
    add("implicit-vr", _bytes(ds), "processed", "ok", "Implicit VR Little Endian")
    ds = _native(_base(next(n)), rgb, ts=DeflatedExplicitVRLittleEndian)
    add("deflated", _bytes(ds), "processed", "ok", "Deflated Explicit VR Little Endian")
    ds = _native(_base(next(n)), rgb)
    ds.compress(RLELossless)
    add("rle", _bytes(ds), "processed", "ok", "RLE Lossless")
    ds = _native(_base(next(n)), rgb)
    ds.compress(JPEGLSLossless)
    add("jpeg-ls", _bytes(ds), "processed", "ok", "JPEG-LS lossless")
    ds = _native(_base(next(n)), rgb)
    ds.compress(JPEG2000, j2k_cr=[20], photometric_interpretation="YBR_ICT")
    add("jpeg2000-ybr-ict", _bytes(ds), "processed", "ok", "lossy JPEG 2000 with the irreversible colour transform")
    ds = _base(next(n))
    for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        delattr(ds, k)
    add("no-patient-module-values", _bytes(ds), "processed", "ok", "type 2 patient attributes absent")
    ds = _base(next(n))
    ds.SOPClassUID = VL
    ds.file_meta.MediaStorageSOPClassUID = VL
    ds.Modality = "XC"
    add("vl-photographic", _bytes(ds), "processed", "ok", "VL Photographic Image Storage")
    ds = _base(next(n))
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    arr_ds = _native(ds, rgb, ts=ExplicitVRBigEndian)
    add("big-endian", _bytes(arr_ds), "no-context", "ok", "retired Explicit VR Big Endian: not negotiated; readable offline")

    # -- refused at intake (no job) ---------------------------------------------------------
    ds = _base(next(n))
    del ds.StudyInstanceUID
    add("missing-study-uid", _bytes(ds), "0xC000", "fail", "StudyInstanceUID missing")
    ds = _base(next(n))
    body = _explicit_body(ds)
    del ds.SOPInstanceUID
    add("missing-sop-instance-uid", _raw_file(_base(next(n)), _explicit_body(ds)), "0xC000", "fail", "SOPInstanceUID missing")
    ds = _base(next(n))
    ds.SOPClassUID = VL  # file meta (and so the presentation context) still says DMS
    add("sop-class-mismatch", _raw_file(ds, _explicit_body(_native(ds, rgb))), "0xA900", "ok",
        "dataset SOP class (VL) differs from the presentation context (DMS)")
    ds = _base(next(n))
    stream = (FIXTURES / "images" / "ISIC_0000552.jpg").read_bytes()  # what _base encapsulates
    ds = _set_jpeg(ds, stream[: len(stream) // 3], ds.Rows, ds.Columns)
    add("truncated-pixel-data", _bytes(ds), "0xC000", "fail", "JPEG stream cut to a third")
    ds = _native(_base(next(n)), rgb)
    ds.Rows = ds.Rows + 50
    add("rows-columns-mismatch", _bytes(ds), "0xC000", "fail", "Rows larger than the native data")
    ds = _base(next(n))
    ds = _set_jpeg(ds, stream[:200] + b"\x00\x11\x22" * 40 + stream[320:400], ds.Rows, ds.Columns)
    add("corrupt-jpeg", _bytes(ds), "0xC000", "fail", "JPEG headers followed by garbage")
    ds = _native(_base(next(n)), np.concatenate([rgb, rgb]).reshape(2, *rgb.shape))
    ds.NumberOfFrames = 2
    ds.Rows, ds.Columns = rgb.shape[:2]
    add("multi-frame", _bytes(ds), "0xC000", "fail", "two frames")
    ds = _native(_base(next(n)), rgb)
    ds.PhotometricInterpretation = "MONOCHROME2"
    add("wrong-photometric", _bytes(ds), "0xC000", "fail", "RGB data labelled MONOCHROME2 with 3 samples")
    ds = _base(next(n))
    ds.PixelData = b""
    add("zero-length-pixel-data", _raw_file(ds, _explicit_body(ds)), "0xC000", "fail", "empty pixel data")
    ds = _base(next(n))
    del ds.PixelData
    add("no-pixel-data", _bytes(ds), "0xC000", "fail", "no pixel data element")
    ds = _base(next(n))
    ds.Rows = ds.Columns = 65535
    add("declared-65535x65535", _bytes(ds), "0xC000", "fail", "4.3 GP declared: refused from the header")
    ds = _base(next(n))
    ds = _set_jpeg(ds, _sof_dims(stream, 65500, 65500), ds.Rows, ds.Columns)
    add("jpeg-bomb", _bytes(ds), "0xC000", "fail", "SOF declares 65500x65500 behind a small header")
    ds = _base(next(n))
    ds = _set_jpeg(ds, stream, 100, 100)
    add("jpeg-dims-mismatch", _bytes(ds), "0xC000", "fail", "header 100x100, stream 679x566")
    ds = _native(_base(next(n)), np.dstack([rgb, rgb[..., :1]]))
    ds.PhotometricInterpretation = "ARGB"
    add("four-samples", _bytes(ds), "0xC000", "fail", "4 samples per pixel (retired ARGB)")
    ds = _native(_base(next(n)), rgb)
    ds.BitsAllocated = 1
    add("bits-allocated-1", _bytes(ds), "0xC000", "fail", "1-bit colour")
    ds = _native(_base(next(n)), rgb)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit  # says JPEG, data is native
    add("transfer-syntax-lie", _raw_file(ds, _explicit_body(ds)), "0xC000", "fail", "JPEG transfer syntax over native pixel data")
    # An undefined-length item delimiter where a plain element should be: (FFFE,E00D) at top level.
    ds = _base(next(n))
    body = _explicit_body(ds)
    i = body.index(b"\x10\x00\x10\x00")  # (0010,0010) PatientName
    body = body[:i] + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body[i:]
    add("undefined-length-item-misplaced", _raw_file(ds, body), "0xC000", "fail", "item / delimiter tags outside any sequence")
    ds = _base(next(n))
    body = _explicit_body(ds)
    add("truncated-dataset", _raw_file(ds, body[: len(body) // 2]), "0xC000", "fail", "the dataset stops mid-element")
    ds = _base(next(n))
    add("empty-dataset", _raw_file(ds, b""), "0xC000", "fail", "file meta only")

    # -- the node's own outputs --------------------------------------------------------------
    ds = _native(_base(next(n)), rgb)
    from node.evidence.identity import NodeIdentity

    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Manufacturer, ds.ManufacturerModelName = NodeIdentity().manufacturer, NodeIdentity().model_name
    add("own-derived-image", _bytes(ds), "ignored", "ok", "a resized image this node made, routed back")
    return cases


def write(out: Path) -> list[Case]:
    out.mkdir(parents=True, exist_ok=True)
    cases = build()
    for c in cases:
        (out / f"{c.name}.dcm").write_bytes(c.data)
    (out / "expected.json").write_text(json.dumps(
        {c.name: {"net": c.net, "offline": c.offline, "why": c.why} for c in cases}, indent=2))
    return cases


if __name__ == "__main__":
    cs = write(Path(sys.argv[1] if len(sys.argv) > 1 else "corpus-out"))
    print(f"{len(cs)} cases written")
