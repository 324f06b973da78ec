"""Test helpers: wrap real fixture JPEGs as DICOM and re-encode them in other transfer syntaxes.

Only for tests. A fixture's JPEG bytes are encapsulated untouched as JPEG Baseline
(YBR_FULL_422), as dermatoscopes send them; other transfer syntaxes are produced from
an uncompressed copy with DCMTK (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``dcmdjpeg``)
or with pydicom's encoders.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "data" / "fixtures"
DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
DCMTK_TOOLS = ("dcmdjpeg", "dcmcjpeg", "dcmcjpls", "dcmcrle")


def fixtures_available() -> bool:
    return (FIXTURES / "labels.csv").is_file()


def dcmtk_available() -> bool:
    return all(shutil.which(t) for t in DCMTK_TOOLS)


def fixture_rows() -> list[dict[str, str]]:
    with open(FIXTURES / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def fixture_path(name: str) -> Path:
    return FIXTURES / "images" / name


def fixture_rgb(name: str, long_side: int | None = None) -> np.ndarray:
    """A fixture decoded by Pillow as RGB, optionally reduced (draft + Lanczos)."""
    with Image.open(fixture_path(name)) as im:
        if long_side:
            im.draft("RGB", (long_side * 2, long_side * 2))
            im = im.convert("RGB")
            im.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
        return np.asarray(im.convert("RGB"))


def jpeg_sof_info(data: bytes) -> tuple[int, int, int, list[tuple[int, int]]]:
    """(rows, cols, components, sampling factors) from the first SOF marker of a JPEG."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"no marker at {i}")
        marker = data[i + 1]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3):
            rows = int.from_bytes(data[i + 5 : i + 7], "big")
            cols = int.from_bytes(data[i + 7 : i + 9], "big")
            n = data[i + 9]
            sampling = [(data[j] >> 4, data[j] & 15) for j in range(i + 11, i + 11 + 3 * n, 3)]
            return rows, cols, n, sampling
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise ValueError("no SOF marker")


def sof_offset(data: bytes) -> int:
    """Byte offset of the SOF0/1 marker in a JPEG stream."""
    i = 2
    while i + 4 <= len(data):
        if data[i + 1] in (0xC0, 0xC1, 0xC3):
            return i
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise ValueError("no SOF marker")


def base_dataset(rows: int, cols: int, samples: int = 3, bits: int = 8, stored: int | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = DERMOSCOPIC_PHOTOGRAPHY
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DMS"
    ds.PatientName = "Test^Decode"
    ds.PatientID = "T1"
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = samples
    ds.BitsAllocated = bits
    ds.BitsStored = stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    return ds


def set_meta(ds: Dataset, tsyntax: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = tsyntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def wrap_jpeg_bytes(data: bytes, photometric: str | None = None) -> Dataset:
    """Encapsulate JPEG Baseline bytes untouched, as a dermatoscope does.

    The photometric interpretation follows the stream: YBR_FULL_422 for subsampled chroma,
    YBR_FULL for 4:4:4, MONOCHROME2 for one component; ``photometric`` overrides it.
    """
    rows, cols, ncomp, sampling = jpeg_sof_info(data)
    ds = base_dataset(rows, cols, ncomp)
    if photometric is None:
        if ncomp == 1:
            photometric = "MONOCHROME2"
        else:
            photometric = "YBR_FULL" if all(f == (1, 1) for f in sampling) else "YBR_FULL_422"
    ds.PhotometricInterpretation = photometric
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([data])
    ds["PixelData"].VR = "OB"
    return set_meta(ds, JPEGBaseline8Bit)


def wrap_jpeg(path: Path, photometric: str | None = None) -> Dataset:
    return wrap_jpeg_bytes(Path(path).read_bytes(), photometric)


def reference_rgb(src: bytes | Path) -> np.ndarray:
    """The reference decode of a JPEG: Pillow (libjpeg-turbo), RGB uint8."""
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        return np.asarray(im.convert("RGB"))


def native_dataset(arr: np.ndarray, *, photometric: str = "RGB", planar: int = 0,
                   tsyntax: str = ExplicitVRLittleEndian, bits_stored: int | None = None) -> Dataset:
    """Uncompressed dataset holding ``arr`` as is (rows x cols [x 3], uint8 or uint16)."""
    samples = 1 if arr.ndim == 2 else arr.shape[2]
    bits = 8 * arr.dtype.itemsize
    ds = base_dataset(arr.shape[0], arr.shape[1], samples, bits, bits_stored)
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = planar
        data = arr.transpose(2, 0, 1) if planar == 1 else arr
    else:
        data = arr
    ds.PixelData = np.ascontiguousarray(data).astype(arr.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return set_meta(ds, tsyntax)


def to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    from pydicom.pixels import convert_color_space

    return convert_color_space(rgb, "RGB", "YBR_FULL")


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def roundtrip(ds: Dataset) -> Dataset:
    """Write and read back through pydicom, as the node reads a received file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def dcmtk(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr or proc.stdout}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def colour_error(decoded: np.ndarray, reference: np.ndarray) -> float:
    """Largest difference between per-channel means: catches swapped channels, YBR left
    unconverted or converted twice, which PSNR alone could blur on a grey-ish image."""
    a = decoded.reshape(-1, 3).mean(axis=0)
    b = reference.reshape(-1, 3).mean(axis=0)
    return float(np.abs(a - b).max())
