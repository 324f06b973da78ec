"""Decode one DICOM photograph into an RGB ``uint8`` array, or say precisely why not.

``check_header(ds, max_pixels)`` validates the header and the cheap structure of the
pixel data *without decoding*: dimensions against the limit, consistency of the image
pixel attributes, NumberOfFrames (and a multi-entry Basic Offset Table), the native data
length, and for encapsulated data the fragment structure, the end-of-image marker and
the real stream dimensions from the codestream header (JPEG SOFn, JPEG-LS SOF55, JPEG
2000 SIZ, RLE segment table). A JPEG whose SOF declares 65535 x 65535 behind a small
Rows/Columns is refused here, before any decoder allocates for it. For Huffman JPEG it
also checks that the scan is long enough to code the image (>= 2 bits per 8x8 block,
>= 1 bit per lossless sample): libjpeg fills a cut-short scan with grey and only warns.

``decode_rgb(ds)`` runs ``check_header`` and decodes frame 0 with pydicom's decoder
framework (``pydicom.pixels.get_decoder(ts).as_array``), always asking for the data
*as decoded* (``as_rgb=False``) and trusting the photometric interpretation pydicom
reports for the returned array; that report follows the codestream, not the header.
What the decoders return (measured, pydicom 3.0.2):

* JPEG Baseline/Extended, Pillow and pylibjpeg-libjpeg plugins: YCbCr (YBR_FULL or
  YBR_FULL_422), already upsampled to full resolution. A stream with component IDs
  'R','G','B' comes back as RGB even when the header says YBR; a JFIF stream labelled
  RGB comes back as YBR_FULL_422. 12-bit JPEG Extended: only pylibjpeg, uint16 YCbCr.
* JPEG 2000 (openjpeg or Pillow): YBR_ICT / YBR_RCT come back as RGB; the decoder
  applies the inverse multi-component transform itself, converting again is wrong.
* JPEG Lossless, JPEG-LS, RLE and native: the stored components untouched (native
  YBR_FULL_422 is expanded to YBR_FULL; PlanarConfiguration 1 is interleaved).

8-bit JPEG uses the Pillow plugin only (libjpeg-turbo): ~3x faster than pylibjpeg on
10 MP frames, and it reports broken entropy-coded data that pylibjpeg-libjpeg decodes
silently into garbage, so there is no fall-back to the other plugin.

YCbCr -> RGB is then done here exactly once: for 8 bits with libjpeg's own fixed-point
tables (bit-identical to Pillow/libjpeg-turbo decoding the JPEG to RGB), above 8 bits
in float with the same full-range BT.601 equations. Samples with BitsStored n > 8 are
scaled linearly full scale to full scale, ``round(v * 255 / (2**n - 1))``. MONOCHROME1 is
inverted, monochrome replicated to three channels, PALETTE COLOR goes through its LUTs.
Modality and VOI LUTs are not applied (a photograph, not a measurement).

Every refusal is a :class:`DecodeError` (a ``ValueError``) with a human-readable reason.
Known limit: a corrupt JPEG entropy segment of plausible length (bytes overwritten, not
cut) may still decode to garbage without error; libjpeg only warns about it.
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
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
    UID,
)

__all__ = ["DecodeError", "DEFAULT_MAX_PIXELS", "SUPPORTED_TRANSFER_SYNTAXES", "check_header", "decode_rgb"]

#: Default pixel limit of :func:`decode_rgb` (100 megapixels; dermatoscopes go to ~24 MP).
DEFAULT_MAX_PIXELS = 100_000_000

NATIVE_SYNTAXES = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian}
)
_JPEG_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})
_JPEGLS_SYNTAXES = frozenset({JPEGLSLossless, JPEGLSNearLossless})
_J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
SUPPORTED_TRANSFER_SYNTAXES = frozenset(
    NATIVE_SYNTAXES | _JPEG_SYNTAXES | _JPEGLS_SYNTAXES | _J2K_SYNTAXES | {RLELossless}
)

_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_SINGLE = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"})

# How much of an encapsulated frame is gathered to find the codestream header.
_PEEK_BYTES = 1 << 20


class DecodeError(ValueError):
    """The dataset's pixel data cannot be turned into an RGB image; ``str()`` says why."""


# --------------------------------------------------------------------------- header


def _int_attr(ds: Dataset, keyword: str, *, required: bool = True, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # a malformed value that pydicom cannot convert
        raise DecodeError(f"{keyword} cannot be read: {exc}") from exc
    if value is None or value == "":
        if required:
            raise DecodeError(f"{keyword} is missing")
        return default
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, str):
        raise DecodeError(f"{keyword} must be a single value, got {value!r}")
    try:
        ivalue = int(value)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{keyword} is not an integer: {value!r}") from exc
    if ivalue != value and str(ivalue) != str(value).strip():
        raise DecodeError(f"{keyword} is not an integer: {value!r}")
    return ivalue


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise DecodeError("no Transfer Syntax UID (file meta information missing)")
    ts = UID(str(ts))
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        name = ts.name if ts.is_valid and ts.name != ts else "unknown"
        raise DecodeError(f"unsupported transfer syntax {ts} ({name})")
    return ts


def _pixel_bytes(ds: Dataset) -> bytes:
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            raise DecodeError(f"{other[0]} is not supported (floating-point pixels); need PixelData")
        raise DecodeError("no pixel data (7FE0,0010) in the dataset")
    try:
        value = ds.PixelData
    except Exception as exc:
        raise DecodeError(f"pixel data cannot be read: {exc}") from exc
    if value is None or len(value) == 0:
        raise DecodeError("pixel data is empty (zero length)")
    return value


def check_header(ds: Dataset, max_pixels: int) -> None:
    """Validate header and pixel-data structure without decoding; raise DecodeError if unusable."""
    ts = _transfer_syntax(ds)
    rows = _int_attr(ds, "Rows")
    cols = _int_attr(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise DecodeError(f"invalid image size Rows={rows} Columns={cols}")
    if rows * cols > max_pixels:
        raise DecodeError(
            f"image too large: {rows} x {cols} = {rows * cols} pixels, limit is {max_pixels}"
        )
    frames = _int_attr(ds, "NumberOfFrames", required=False, default=1)
    if frames is None or frames < 1:
        raise DecodeError(f"invalid NumberOfFrames {frames}")
    if frames > 1:
        raise DecodeError(f"multi-frame not supported (NumberOfFrames={frames})")

    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not pi:
        raise DecodeError("PhotometricInterpretation is missing")
    spp = _int_attr(ds, "SamplesPerPixel")
    if pi in _COLOUR:
        if spp != 3:
            raise DecodeError(f"PhotometricInterpretation {pi} needs SamplesPerPixel 3, got {spp}")
    elif pi in _SINGLE:
        if spp != 1:
            raise DecodeError(f"PhotometricInterpretation {pi} needs SamplesPerPixel 1, got {spp}")
    else:
        raise DecodeError(f"unsupported photometric interpretation {pi!r}")
    if pi in ("YBR_ICT", "YBR_RCT") and ts not in _J2K_SYNTAXES:
        raise DecodeError(f"{pi} is only valid with JPEG 2000, not {ts.name}")

    ba = _int_attr(ds, "BitsAllocated")
    if ba not in (8, 16):
        raise DecodeError(f"unsupported BitsAllocated {ba} (need 8 or 16)")
    bs = _int_attr(ds, "BitsStored", required=False, default=ba)
    if not 1 <= bs <= ba:
        raise DecodeError(f"BitsStored {bs} inconsistent with BitsAllocated {ba}")
    hb = _int_attr(ds, "HighBit", required=False, default=bs - 1)
    if not bs - 1 <= hb < ba:
        raise DecodeError(f"HighBit {hb} inconsistent with BitsStored {bs} / BitsAllocated {ba}")
    if _int_attr(ds, "PixelRepresentation", required=False, default=0) not in (0, 1):
        raise DecodeError("PixelRepresentation must be 0 or 1")
    if spp == 3:
        planar = _int_attr(ds, "PlanarConfiguration", required=False, default=0)
        if planar not in (0, 1):
            raise DecodeError(f"invalid PlanarConfiguration {planar}")
    if pi == "PALETTE COLOR":
        missing = [
            k
            for k in ("RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
                      "BluePaletteColorLookupTableDescriptor")
            if k not in ds
        ]
        if missing:
            raise DecodeError(f"PALETTE COLOR without {missing[0]}")

    data = _pixel_bytes(ds)
    if ts in NATIVE_SYNTAXES:
        _check_native_length(len(data), rows, cols, spp, ba, pi)
    else:
        _check_encapsulated(data, ts, rows, cols, spp, ba, max_pixels)


def _check_native_length(n: int, rows: int, cols: int, spp: int, ba: int, pi: str) -> None:
    per_pixel = spp * ba // 8
    if pi == "YBR_FULL_422":  # native 4:2:2 stores Y1 Y2 Cb Cr per pixel pair
        per_pixel = 2 * ba // 8
    expected = rows * cols * per_pixel
    if n < expected:
        raise DecodeError(
            f"pixel data truncated: {n} bytes, expected {expected} for {rows} x {cols} x {spp} "
            f"at {ba} bits"
        )
    if n > expected + (expected % 2) + 1:
        extra = ""
        if n % expected in (0, 1) and n // expected > 1:
            extra = f" (holds {n // expected} frames' worth of data; NumberOfFrames missing?)"
        raise DecodeError(
            f"Rows/Columns {rows} x {cols} do not match the pixel data: {n} bytes, "
            f"expected {expected}{extra}"
        )


def _fragments(data: bytes) -> list[memoryview]:
    """Split encapsulated pixel data into fragments (Basic Offset Table dropped)."""
    view = memoryview(data)
    out: list[memoryview] = []
    pos, first = 0, True
    n = len(view)
    while pos + 8 <= n:
        group, elem, length = struct.unpack_from("<HHL", view, pos)
        tag = (group << 16) | elem
        if tag == 0xFFFEE0DD:
            break
        if tag != 0xFFFEE000:
            raise DecodeError(
                f"malformed encapsulated pixel data: expected an item tag at byte {pos}, "
                f"found ({group:04X},{elem:04X})"
            )
        if length == 0xFFFFFFFF or pos + 8 + length > n:
            raise DecodeError(
                f"encapsulated pixel data truncated: item at byte {pos} declares {length} bytes, "
                f"{n - pos - 8} left"
            )
        if first and length > 4:
            raise DecodeError(
                f"multi-frame not supported (Basic Offset Table lists {length // 4} frames)"
            )
        if not first:
            out.append(view[pos + 8 : pos + 8 + length])
        first = False
        pos += 8 + length
    if first:
        raise DecodeError("malformed encapsulated pixel data: no Basic Offset Table item")
    out = [f for f in out if len(f)]
    if not out:
        raise DecodeError("encapsulated pixel data holds no fragments (zero length)")
    return out


def _frame_bytes(data: bytes) -> bytes:
    frags = _fragments(data)
    return frags[0].tobytes() if len(frags) == 1 else b"".join(f.tobytes() for f in frags)


def _head(frags: list[memoryview]) -> bytes:
    buf = bytearray()
    for f in frags:
        buf += f[: _PEEK_BYTES - len(buf)]
        if len(buf) >= _PEEK_BYTES:
            break
    return bytes(buf)


def _tail(frags: list[memoryview]) -> bytes:
    tail = bytes(frags[-1][-64:])
    if len(tail) < 64 and len(frags) > 1:
        tail = bytes(frags[-2][-64:]) + tail
    return tail


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def jpeg_stream_info(head: bytes) -> dict[str, Any]:
    """Read a JPEG / JPEG-LS frame header from the start of a codestream.

    Returns ``marker`` (the SOFn), ``precision``, ``rows``, ``cols``, ``components``,
    ``sampling`` (one (H, V) per component) and ``scan_start`` (offset of the first byte
    after the first SOS header, or -1 when ``head`` ends before it).
    """
    if len(head) < 4 or head[0] != 0xFF or head[1] != 0xD8:
        raise DecodeError("corrupt JPEG stream: does not start with an SOI marker")
    i, n = 2, len(head)
    info: dict[str, Any] | None = None
    while i + 4 <= n:
        if head[i] != 0xFF:
            raise DecodeError(f"corrupt JPEG stream: expected a marker at byte {i}")
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            i += 2
            continue
        if marker == 0xD9:
            raise DecodeError("corrupt JPEG stream: end of image before any scan")
        seglen = int.from_bytes(head[i + 2 : i + 4], "big")
        if seglen < 2:
            raise DecodeError(f"corrupt JPEG stream: bad segment length at byte {i}")
        if marker in _SOF_MARKERS and info is None:
            if i + 10 > n:
                break
            ncomp = head[i + 9]
            sampling = [
                (head[j] >> 4, head[j] & 0x0F)
                for j in range(i + 11, min(i + 11 + 3 * ncomp, n), 3)
            ]
            info = {
                "marker": marker,
                "precision": head[i + 4],
                "rows": int.from_bytes(head[i + 5 : i + 7], "big"),
                "cols": int.from_bytes(head[i + 7 : i + 9], "big"),
                "components": ncomp,
                "sampling": sampling,
                "scan_start": -1,
            }
        elif marker == 0xDA:
            if info is None:
                raise DecodeError("corrupt JPEG stream: no frame header (SOF) before the scan")
            info["scan_start"] = i + 2 + seglen
            return info
        i += 2 + seglen
    if info is None:
        raise DecodeError("corrupt or truncated JPEG stream: no frame header (SOF) found")
    return info


def _min_scan_bits(info: dict[str, Any]) -> int:
    """A lower bound on the entropy-coded bits of a Huffman-coded sequential JPEG.

    Every 8 x 8 block of a DCT image codes a DC difference and an AC run (or EOB), each
    at least one bit; every sample of a lossless image codes at least one bit.
    """
    rows, cols, marker = info["rows"], info["cols"], info["marker"]
    sampling = info["sampling"]
    if marker == 0xC3:
        return rows * cols * len(sampling)
    if marker not in (0xC0, 0xC1) or not sampling:
        return 0
    hmax = max(h for h, _ in sampling) or 1
    vmax = max(v for _, v in sampling) or 1
    blocks = 0
    for h, v in sampling:
        blocks += math.ceil(math.ceil(cols * h / hmax) / 8) * math.ceil(math.ceil(rows * v / vmax) / 8)
    return 2 * blocks


def _j2k_stream_info(head: bytes) -> dict[str, int]:
    idx = head.find(b"\xff\x4f\xff\x51")  # SOC + SIZ (also finds a codestream inside a JP2 box)
    if idx < 0 or idx + 42 > len(head):
        raise DecodeError("corrupt JPEG 2000 stream: no SOC/SIZ header")
    p = idx + 4
    _lsiz, _rsiz, xsiz, ysiz, xo, yo = struct.unpack_from(">HHLLLL", head, p)
    csiz = struct.unpack_from(">H", head, p + 36)[0]
    ssiz = head[p + 38] if p + 38 < len(head) else 7
    return {
        "rows": ysiz - yo,
        "cols": xsiz - xo,
        "components": csiz,
        "precision": (ssiz & 0x7F) + 1,
    }


def _check_encapsulated(data: bytes, ts: UID, rows: int, cols: int, spp: int, ba: int,
                        max_pixels: int) -> None:
    if len(data) >= 4 and data[:4] != b"\xfe\xff\x00\xe0":
        raise DecodeError(
            f"pixel data is not encapsulated although the transfer syntax is {ts.name}"
        )
    frags = _fragments(data)
    head = _head(frags)
    if ts == RLELossless:
        if len(head) < 64:
            raise DecodeError("corrupt RLE data: header shorter than 64 bytes")
        nseg = struct.unpack_from("<L", head, 0)[0]
        want = spp * ba // 8
        if nseg != want:
            raise DecodeError(f"corrupt RLE data: {nseg} segments, expected {want}")
        offsets = struct.unpack_from("<15L", head, 4)[:nseg]
        total = sum(len(f) for f in frags)
        if offsets[0] != 64 or any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= total:
            raise DecodeError("corrupt or truncated RLE data: invalid segment offsets")
        return

    if ts in _J2K_SYNTAXES:
        info = _j2k_stream_info(head)
        kind = "JPEG 2000"
    else:
        info = jpeg_stream_info(head)
        kind = "JPEG-LS" if ts in _JPEGLS_SYNTAXES else "JPEG"
        if ts in _JPEGLS_SYNTAXES and info["marker"] != 0xF7:
            raise DecodeError(f"transfer syntax is {ts.name} but the stream is not JPEG-LS")
        if ts in _JPEG_SYNTAXES and info["marker"] == 0xF7:
            raise DecodeError(f"transfer syntax is {ts.name} but the stream is JPEG-LS")
    srows, scols = info["rows"], info["cols"]
    if srows <= 0 or scols <= 0:
        raise DecodeError(f"{kind} stream declares an invalid size {scols} x {srows}")
    if srows * scols > max_pixels:
        raise DecodeError(
            f"{kind} stream declares {srows} x {scols} = {srows * scols} pixels, limit is {max_pixels}"
        )
    if (srows, scols) != (rows, cols):
        raise DecodeError(
            f"{kind} stream is {srows} x {scols} (rows x cols) but the header says "
            f"Rows={rows} Columns={cols}"
        )
    if info["components"] != spp:
        raise DecodeError(
            f"{kind} stream has {info['components']} components but SamplesPerPixel is {spp}"
        )
    if info["precision"] > ba:
        raise DecodeError(
            f"{kind} stream precision {info['precision']} bits exceeds BitsAllocated {ba}"
        )
    # A complete JPEG / JPEG-LS / JPEG 2000 codestream ends with FFD9 (EOI / EOC); the
    # fragment may carry a trailing pad byte. FF D9 cannot occur inside entropy-coded data.
    tail = _tail(frags).rstrip(b"\x00")
    if b"\xff\xd9" not in tail[-8:]:
        raise DecodeError(f"{kind} stream truncated: no end-of-image marker")
    if kind == "JPEG" and info["scan_start"] > 0:
        scan_bytes = sum(len(f) for f in frags) - info["scan_start"] - 2
        if scan_bytes * 8 < _min_scan_bits(info):
            raise DecodeError(
                f"corrupt JPEG stream: {scan_bytes} bytes of scan data cannot code a "
                f"{scols} x {srows} image"
            )


# --------------------------------------------------------------------------- decode


def _decode_array(ds: Dataset, ts: UID, decoding_plugin: str | None = None) -> tuple[np.ndarray, str]:
    """Decode frame 0 as stored; return the array and its actual photometric interpretation."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(ts)
    if decoding_plugin is not None:
        plugins = [decoding_plugin]
    elif (
        ts in (JPEGBaseline8Bit, JPEGExtended12Bit)
        and int(ds.get("BitsStored", 8)) <= 8
        and "pillow" in decoder.available_plugins
    ):
        # libjpeg-turbo via Pillow: ~3x faster than pylibjpeg-libjpeg on 10 MP frames and
        # it reports broken entropy-coded data, which pylibjpeg-libjpeg decodes silently
        # into garbage. So no fallback to the other plugin after a Pillow error.
        plugins = ["pillow"]
    else:
        plugins = [""]
    last: Exception | None = None
    for plugin in plugins:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr, meta = decoder.as_array(ds, index=0, as_rgb=False, decoding_plugin=plugin)
            return arr, str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
        except MemoryError:
            raise DecodeError("not enough memory to decode the image") from None
        except Exception as exc:  # decoders raise RuntimeError/ValueError/OSError...
            last = exc
    reason = str(last).strip().replace("\n", " ")
    if ts in NATIVE_SYNTAXES:
        raise DecodeError(f"pixel data cannot be read: {reason}") from last
    raise DecodeError(f"corrupt compressed pixel data ({ts.name}): {reason}") from last


def _to_8bit(arr: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    if arr.dtype == np.uint8 and bits == 8 and not signed:
        return arr
    a = arr.astype(np.int64 if arr.dtype.itemsize > 2 else np.int32)
    if signed:
        a = a + (1 << (bits - 1))
    a = np.clip(a, 0, (1 << bits) - 1)
    if bits == 8:
        return a.astype(np.uint8)
    scaled = np.rint(a.astype(np.float32) * np.float32(255.0 / ((1 << bits) - 1)))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _ybr8_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The fixed-point tables of libjpeg's jdcolor.c (SCALEBITS 16), so an 8-bit result is
    # bit-identical to what libjpeg(-turbo) itself produces for a JFIF image.
    s, half = 16, 1 << 15
    x = np.arange(256, dtype=np.int64) - 128

    def fix(v: float) -> int:
        return int(v * (1 << s) + 0.5)

    cr_r = ((fix(1.40200) * x + half) >> s).astype(np.int16)
    cb_b = ((fix(1.77200) * x + half) >> s).astype(np.int16)
    g = ((-fix(0.34414) * x + half)[:, None] + (-fix(0.71414) * x)[None, :]) >> s
    return cr_r, cb_b, g.astype(np.int16).ravel()  # g indexed by (cb << 8) | cr


_CR_R, _CB_B, _G_CBCR = _ybr8_tables()


def _ybr8_to_rgb(arr: np.ndarray) -> np.ndarray:
    y = arr[..., 0].astype(np.int16)
    cb, cr = arr[..., 1], arr[..., 2]
    out = np.empty(arr.shape, np.uint8)
    for ch, delta in enumerate(
        (_CR_R[cr], _G_CBCR[(cb.astype(np.uint16) << 8) | cr], _CB_B[cb])
    ):
        t = y + delta
        np.clip(t, 0, 255, out=t)
        out[..., ch] = t
        del t, delta
    return out


def _ybr_to_rgb(arr: np.ndarray, bits: int) -> np.ndarray:
    """Full-range YCbCr (DICOM YBR_FULL, JFIF) to RGB, scaled to 8 bits."""
    if arr.dtype == np.uint8 and bits == 8:
        return _ybr8_to_rgb(arr)
    maxv = float((1 << bits) - 1)
    half = float(1 << (bits - 1))
    a = arr.astype(np.float32)
    y, cb, cr = a[..., 0], a[..., 1] - half, a[..., 2] - half
    out = np.empty(a.shape, np.float32)
    out[..., 0] = y + 1.402 * cr
    out[..., 1] = y - 0.344136 * cb - 0.714136 * cr
    out[..., 2] = y + 1.772 * cb
    np.clip(out, 0.0, maxv, out=out)
    return np.clip(np.rint(out * np.float32(255.0 / maxv)), 0, 255).astype(np.uint8)


def decode_rgb(
    ds: Dataset, *, max_pixels: int = DEFAULT_MAX_PIXELS, decoding_plugin: str | None = None
) -> np.ndarray:
    """Decode a single-frame image to a C-contiguous ``rows x cols x 3`` ``uint8`` RGB array.

    ``decoding_plugin`` forces one pydicom decoding plugin ("pillow", "pylibjpeg",
    "pyjpegls", "pydicom"); by default Pillow for 8-bit JPEG, pydicom's order otherwise.
    Raises :class:`DecodeError` with a specific reason for anything it cannot decode.
    """
    check_header(ds, max_pixels)
    ts = _transfer_syntax(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.SamplesPerPixel)
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    header_pi = str(ds.PhotometricInterpretation).strip().upper()

    arr, pi = _decode_array(ds, ts, decoding_plugin)
    pi = pi.strip().upper()
    expected = (rows, cols, 3) if spp == 3 else (rows, cols)
    if arr.shape != expected:
        raise DecodeError(f"decoded array has shape {arr.shape}, expected {expected}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DecodeError(f"decoded array has unsupported dtype {arr.dtype}")
    if arr.dtype.itemsize == 1:
        bits = min(bits, 8)  # a decoder that returns 8-bit output has already reduced it

    if spp == 3:
        if signed:
            raise DecodeError("signed colour pixel data is not supported")
        if pi in ("YBR_FULL", "YBR_FULL_422"):
            out = _ybr_to_rgb(arr, bits)
        elif pi in ("RGB", "YBR_ICT", "YBR_RCT"):
            # ICT/RCT are inverted by the JPEG 2000 decoder; pydicom reports them as RGB.
            out = _to_8bit(arr, bits, False)
        else:
            raise DecodeError(f"decoder returned unsupported colour space {pi}")
    elif header_pi == "PALETTE COLOR":
        out = _palette(arr, ds)
    else:
        grey = _to_8bit(arr, bits, signed)
        if header_pi == "MONOCHROME1":
            grey = 255 - grey
        out = np.repeat(grey[..., None], 3, axis=2)
    out = np.ascontiguousarray(out, dtype=np.uint8)
    if not out.flags.writeable:
        out = out.copy()
    return out


def _palette(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(arr, ds)
    except Exception as exc:
        raise DecodeError(f"invalid palette colour lookup tables: {exc}") from exc
    if rgb.dtype == np.uint8:
        return rgb
    desc: Any = ds.RedPaletteColorLookupTableDescriptor
    lut_bits = int(desc[2]) if len(desc) > 2 else 16
    if lut_bits <= 8:
        return np.clip(rgb, 0, 255).astype(np.uint8)
    return _to_8bit(rgb, lut_bits, False)
