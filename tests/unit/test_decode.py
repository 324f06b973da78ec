"""decode_rgb / check_header on a real dermoscopy JPEG in every supported transfer syntax.

The source is a fixture JPEG encapsulated untouched as JPEG Baseline. The reference is
Pillow's RGB decode of that JPEG. Every other syntax is made from an uncompressed copy
of the reference (DCMTK and pydicom encoders), so lossless syntaxes must decode to the
reference exactly, lossy ones closely.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _encode_helpers as eh  # noqa: E402

from node.pipeline.decode import DecodeError, check_header, decode_rgb  # noqa: E402

pytestmark = pytest.mark.skipif(
    not eh.fixtures_available(), reason=f"shared fixtures not found at {eh.FIXTURES}"
)

SOURCE = "ISIC_0000552.jpg"  # 679 x 566 (odd width), JFIF 4:2:0
needs_dcmtk = pytest.mark.skipif(not eh.dcmtk_available(), reason="DCMTK command-line tools not installed")


@pytest.fixture(scope="module")
def source_bytes() -> bytes:
    return eh.fixture_path(SOURCE).read_bytes()


@pytest.fixture(scope="module")
def reference(source_bytes) -> np.ndarray:
    return eh.reference_rgb(source_bytes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("decode")


@pytest.fixture(scope="module")
def native_file(reference, workdir) -> Path:
    return eh.write(eh.native_dataset(reference), workdir / "native.dcm")


def _read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


# ---------------------------------------------------------------- the dermatoscope's own file


def test_baseline_ybr422_matches_pillow(source_bytes, reference, workdir):
    ds = _read(eh.write(eh.wrap_jpeg_bytes(source_bytes), workdir / "baseline.dcm"))
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    out = decode_rgb(ds)
    assert out.shape == reference.shape and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable
    assert np.abs(out.astype(int) - reference).mean() < 2
    assert eh.colour_error(out, reference) < 1


@pytest.mark.parametrize("plugin", ["pillow", "pylibjpeg"])
def test_baseline_each_jpeg_plugin_gives_rgb(source_bytes, reference, plugin):
    """Both pydicom JPEG plugins return YCbCr; decode_rgb must convert exactly once."""
    ds = eh.roundtrip(eh.wrap_jpeg_bytes(source_bytes))
    out = decode_rgb(ds, decoding_plugin=plugin)
    assert np.abs(out.astype(int) - reference).mean() < 2
    assert eh.colour_error(out, reference) < 1


@pytest.mark.parametrize("name", ["ISIC_0000243.jpg", "ISIC_0000091.jpg"])
def test_other_fixture_layouts(name):
    """An Exif (no JFIF) 4:2:2 portrait frame and a JFIF 4:4:4 frame."""
    ref = eh.reference_rgb(eh.fixture_path(name))
    out = decode_rgb(eh.roundtrip(eh.wrap_jpeg(eh.fixture_path(name))))
    assert out.shape == ref.shape
    assert np.abs(out.astype(int) - ref).mean() < 2


@pytest.mark.parametrize("label", ["RGB", "YBR_FULL_422", "YBR_FULL"])
def test_baseline_mislabelled_photometric(source_bytes, reference, label):
    """Devices mislabel JFIF streams; the stream (JFIF marker) decides, not the header."""
    out = decode_rgb(eh.roundtrip(eh.wrap_jpeg_bytes(source_bytes, photometric=label)))
    assert eh.colour_error(out, reference) < 1
    assert eh.psnr(out, reference) > 40


def test_wrong_colour_conversion_is_caught(source_bytes, reference):
    """The colour checks used above fail on the classic mistakes."""
    from pydicom.pixels import convert_color_space, pixel_array

    ds = eh.roundtrip(eh.wrap_jpeg_bytes(source_bytes))
    good = decode_rgb(ds)
    raw_ybr = pixel_array(ds, as_rgb=False)  # YCbCr left unconverted
    twice = convert_color_space(good, "YBR_FULL", "RGB")  # converted a second time
    bgr = good[..., ::-1]
    assert eh.colour_error(good, reference) < 1
    for wrong in (raw_ybr, twice, bgr):
        assert eh.colour_error(wrong, reference) > 5
        assert np.abs(wrong.astype(int) - reference).mean() > 5


# ---------------------------------------------------------------- uncompressed variants


def _ybr_422_native(rgb: np.ndarray) -> pydicom.Dataset:
    rgb = rgb[:, : rgb.shape[1] // 2 * 2]
    ybr = eh.to_ybr_full(rgb).astype(np.float64)
    y = ybr[..., 0].round().astype(np.uint8)
    cb = ((ybr[:, 0::2, 1] + ybr[:, 1::2, 1]) / 2).round().astype(np.uint8)
    cr = ((ybr[:, 0::2, 2] + ybr[:, 1::2, 2]) / 2).round().astype(np.uint8)
    packed = np.empty((rgb.shape[0], rgb.shape[1] // 2, 4), np.uint8)
    packed[..., 0], packed[..., 1] = y[:, 0::2], y[:, 1::2]
    packed[..., 2], packed[..., 3] = cb, cr
    ds = eh.base_dataset(rgb.shape[0], rgb.shape[1], 3)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.tobytes()
    return eh.set_meta(ds, ExplicitVRLittleEndian)


NATIVE = {
    "explicit-rgb-planar0": lambda r: eh.native_dataset(r),
    "explicit-rgb-planar1": lambda r: eh.native_dataset(r, planar=1),
    "implicit-rgb": lambda r: eh.native_dataset(r, tsyntax=ImplicitVRLittleEndian),
    "deflated-rgb": lambda r: eh.native_dataset(r, tsyntax=DeflatedExplicitVRLittleEndian),
    "rgb-16bit": lambda r: eh.native_dataset(r.astype(np.uint16) * 257),
    "rgb-12bit-planar1": lambda r: eh.native_dataset(
        np.rint(r.astype(np.float64) * 4095 / 255).astype(np.uint16), planar=1, bits_stored=12
    ),
}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_native_exact(name, reference, workdir):
    path = eh.write(NATIVE[name](reference), workdir / f"{name}.dcm")
    ds = _read(path)
    if name == "deflated-rgb":
        assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert path.stat().st_size < reference.nbytes * 0.9  # really deflated
    np.testing.assert_array_equal(decode_rgb(ds), reference)


@pytest.mark.parametrize("planar", [0, 1])
def test_native_ybr_full(reference, planar):
    ds = eh.roundtrip(eh.native_dataset(eh.to_ybr_full(reference), photometric="YBR_FULL", planar=planar))
    out = decode_rgb(ds)
    assert eh.psnr(out, reference) > 40
    assert eh.colour_error(out, reference) < 1


def test_native_ybr_full_422(reference):
    out = decode_rgb(eh.roundtrip(_ybr_422_native(reference)))
    ref = reference[:, : reference.shape[1] // 2 * 2]
    assert out.shape == ref.shape
    assert eh.psnr(out, ref) > 30
    assert eh.colour_error(out, ref) < 1


def _grey(reference: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(reference).convert("L"))


def test_monochrome2_replicated(reference):
    grey = _grey(reference)
    out = decode_rgb(eh.roundtrip(eh.native_dataset(grey, photometric="MONOCHROME2")))
    assert out.shape == grey.shape + (3,)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_monochrome1_inverted_12bit(reference):
    grey = _grey(reference)
    stored = np.rint((255 - grey.astype(np.float64)) * 4095 / 255).astype(np.uint16)
    ds = eh.roundtrip(eh.native_dataset(stored, photometric="MONOCHROME1", bits_stored=12))
    np.testing.assert_array_equal(decode_rgb(ds)[..., 1], grey)


def test_palette_colour(reference):
    im = Image.fromarray(reference).quantize(256)
    index = np.asarray(im)
    pal = np.array(im.getpalette()[: 3 * 256], np.uint16).reshape(-1, 3)
    ds = eh.native_dataset(index, photometric="PALETTE COLOR")
    for i, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", (pal[:, i] * 257).astype("<u2").tobytes())
    out = decode_rgb(eh.roundtrip(ds))
    np.testing.assert_array_equal(out, pal[index].astype(np.uint8))
    assert eh.psnr(out, reference) > 25


# ---------------------------------------------------------------- compressed variants

#: name -> (DCMTK command, expectation): "exact" or a minimum PSNR in dB
DCMTK_VARIANTS = {
    "jpeg-baseline-ybr444": (["dcmcjpeg", "+eb", "+s4"], 30),
    "jpeg-baseline-rgb-components": (["dcmcjpeg", "+eb", "+cr"], 30),
    "jpeg-extended-51": (["dcmcjpeg", "+ee"], 30),
    "jpeg-extended-51-12bit": (["dcmcjpeg", "+ee", "+bt"], 30),
    "jpeg-lossless-57": (["dcmcjpeg", "+el"], "exact"),
    "jpeg-lossless-70": (["dcmcjpeg", "+e1"], "exact"),
    "jpeg-lossless-70-fragmented": (["dcmcjpeg", "+e1", "+fs", "64"], "exact"),
    "jpegls-lossless-80": (["dcmcjpls", "+el"], "exact"),
    "jpegls-lossless-80-sample-interleaved": (["dcmcjpls", "+el", "+is"], "exact"),
    "jpegls-near-81": (["dcmcjpls", "+en", "+md", "2"], 40),
    "rle-5": (["dcmcrle"], "exact"),
}


@needs_dcmtk
@pytest.mark.parametrize("name", sorted(DCMTK_VARIANTS))
def test_dcmtk_encoded(name, reference, native_file, workdir):
    cmd, expect = DCMTK_VARIANTS[name]
    out_path = workdir / f"{name}.dcm"
    eh.dcmtk([*cmd, str(native_file), str(out_path)])
    ds = _read(out_path)
    assert ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
    out = decode_rgb(ds)
    assert out.shape == reference.shape
    if expect == "exact":
        np.testing.assert_array_equal(out, reference)
    else:
        assert eh.psnr(out, reference) > expect
    assert eh.colour_error(out, reference) < 2


@needs_dcmtk
def test_dcmtk_decoder_agrees_on_baseline(source_bytes, reference, workdir):
    """An independent decoder (DCMTK/IJG) of the same baseline file agrees with us."""
    src = eh.write(eh.wrap_jpeg_bytes(source_bytes), workdir / "baseline-for-dcmdjpeg.dcm")
    dst = workdir / "dcmdjpeg.dcm"
    eh.dcmtk(["dcmdjpeg", "+cp", str(src), str(dst)])
    theirs = decode_rgb(_read(dst))
    ours = decode_rgb(_read(src))
    assert np.abs(theirs.astype(int) - ours).mean() < 2
    assert eh.colour_error(theirs, ours) < 1


PYDICOM_VARIANTS = {
    # name: (transfer syntax, photometric of the source, header photometric, encoder kwargs, expect)
    "j2k-lossless-90-rct": (JPEG2000Lossless, "RGB", "YBR_RCT", {"use_mct": True}, "exact"),
    "j2k-lossless-90-rgb": (JPEG2000Lossless, "RGB", "RGB", {"use_mct": False}, "exact"),
    "j2k-91-ict": (JPEG2000, "RGB", "YBR_ICT", {"use_mct": True, "j2k_psnr": [45]}, 38),
    "rle-5-ybr-full": (RLELossless, "YBR_FULL", "YBR_FULL", {}, 40),
}


@pytest.mark.parametrize("name", sorted(PYDICOM_VARIANTS))
def test_pydicom_encoded(name, reference):
    ts, src_pi, header_pi, kwargs, expect = PYDICOM_VARIANTS[name]
    arr = eh.to_ybr_full(reference) if src_pi == "YBR_FULL" else reference
    ds = eh.native_dataset(arr, photometric=src_pi)
    ds.compress(ts, **kwargs)
    ds.PhotometricInterpretation = header_pi
    ds = eh.roundtrip(ds)
    assert ds.file_meta.TransferSyntaxUID == ts
    for plugin in (None, "pylibjpeg"):
        out = decode_rgb(ds, decoding_plugin=plugin)
        if expect == "exact":
            np.testing.assert_array_equal(out, reference)
        else:
            assert eh.psnr(out, reference) > expect
        assert eh.colour_error(out, reference) < 1


def test_jpegls_pyjpegls_encoder(reference):
    from pydicom.uid import JPEGLSLossless

    ds = eh.native_dataset(reference)
    ds.compress(JPEGLSLossless)
    np.testing.assert_array_equal(decode_rgb(eh.roundtrip(ds), decoding_plugin="pyjpegls"), reference)


# ---------------------------------------------------------------- refusals


def _refused(ds: pydicom.Dataset, *words: str) -> str:
    with pytest.raises(DecodeError) as info:
        decode_rgb(ds)
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, msg
    assert isinstance(info.value, ValueError)
    return msg


def test_no_pixel_data(source_bytes):
    ds = eh.wrap_jpeg_bytes(source_bytes)
    del ds.PixelData
    _refused(ds, "no pixel data")


def test_zero_length_native_and_encapsulated(reference, source_bytes):
    ds = eh.native_dataset(reference)
    ds.PixelData = b""
    _refused(eh.roundtrip(ds), "empty")
    enc = eh.wrap_jpeg_bytes(source_bytes)
    item = b"\xfe\xff\x00\xe0" + b"\x00\x00\x00\x00"
    enc.PixelData = item + item  # empty Basic Offset Table, then one empty fragment
    _refused(eh.roundtrip(enc), "zero length")


def test_truncated_native(reference):
    ds = eh.native_dataset(reference)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    _refused(eh.roundtrip(ds), "truncated")


def test_rows_columns_mismatch_native(reference):
    ds = eh.native_dataset(reference)
    ds.Rows = ds.Rows + 7  # more pixels declared than stored
    _refused(eh.roundtrip(ds), "truncated")
    ds = eh.native_dataset(reference)
    ds.Columns = ds.Columns - 9  # fewer declared than stored
    _refused(eh.roundtrip(ds), "do not match")


def test_truncated_jpeg(source_bytes):
    cut = source_bytes[: len(source_bytes) * 2 // 3]
    _refused(eh.roundtrip(eh.wrap_jpeg_bytes(cut)), "truncated")


def test_corrupt_jpeg_entropy_data(source_bytes):
    rng = np.random.default_rng(7)
    data = bytearray(source_bytes)
    start = source_bytes.find(b"\xff\xda") + 200
    data[start : start + 4000] = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    _refused(eh.roundtrip(eh.wrap_jpeg_bytes(bytes(data))), "corrupt")


def test_corrupt_jpeg_headers_and_short_scan(source_bytes):
    not_jpeg = b"\x00\x01" + source_bytes[2:]
    ds = eh.wrap_jpeg_bytes(source_bytes)
    ds.PixelData = encapsulate([not_jpeg])
    _refused(eh.roundtrip(ds), "corrupt")
    sos = source_bytes.find(b"\xff\xda")
    short = source_bytes[: sos + 60] + b"\xff\xd9"  # scan cut, EOI appended: decoders say nothing
    _refused(eh.roundtrip(eh.wrap_jpeg_bytes(short)), "corrupt")


def test_multiframe(reference):
    ds = eh.native_dataset(np.concatenate([reference, reference]))
    ds.Rows = reference.shape[0]
    ds.NumberOfFrames = 2
    _refused(eh.roundtrip(ds), "multi-frame not supported")
    with pytest.raises(DecodeError, match="multi-frame"):
        check_header(ds, 10**8)


def test_multiframe_encapsulated_without_number_of_frames(source_bytes):
    """Two JPEG frames, NumberOfFrames missing: the offset table gives it away."""
    ds = eh.wrap_jpeg_bytes(source_bytes)
    ds.PixelData = encapsulate([source_bytes, source_bytes], has_bot=True)
    _refused(eh.roundtrip(ds), "multi-frame not supported")
    ds.NumberOfFrames = 2
    _refused(eh.roundtrip(ds), "multi-frame not supported (NumberOfFrames=2)")


def test_unsupported_photometric_and_syntax(reference, source_bytes):
    ds = eh.native_dataset(reference)
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    _refused(ds, "unsupported photometric", "YBR_PARTIAL_420")
    ds = eh.native_dataset(reference)
    ds.PhotometricInterpretation = "YBR_ICT"
    _refused(ds, "YBR_ICT")
    ds = eh.wrap_jpeg_bytes(source_bytes)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    _refused(ds, "unsupported transfer syntax", "1.2.840.10008.1.2.4.100")
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    _refused(ds, "unsupported transfer syntax")
    ds = eh.native_dataset(reference)
    ds.SamplesPerPixel = 1
    _refused(ds, "SamplesPerPixel")


def test_check_header_refuses_huge_before_decoding():
    """A declared 65535 x 65535 image is refused from the header alone: no allocation."""
    ds = eh.native_dataset(np.zeros((4, 4, 3), np.uint8))
    ds.Rows = ds.Columns = 65535
    t0 = time.perf_counter()
    with pytest.raises(DecodeError, match="too large"):
        check_header(ds, max_pixels=50_000_000)
    with pytest.raises(DecodeError, match="too large"):
        decode_rgb(ds, max_pixels=50_000_000)
    assert time.perf_counter() - t0 < 0.5
    check_header(eh.native_dataset(np.zeros((4, 4, 3), np.uint8)), max_pixels=16)


def _patch_sof(data: bytes, rows: int, cols: int) -> bytes:
    i = eh.sof_offset(data)
    out = bytearray(data)
    out[i + 5 : i + 7] = rows.to_bytes(2, "big")
    out[i + 7 : i + 9] = cols.to_bytes(2, "big")
    return bytes(out)


def test_jpeg_bomb_sof_dims(source_bytes):
    """The JPEG stream, not the header, decides how much a decoder allocates."""
    bomb = _patch_sof(source_bytes, 65535, 65535)
    ds = eh.wrap_jpeg_bytes(source_bytes)  # header keeps the real 566 x 679
    ds.PixelData = encapsulate([bomb])
    with pytest.raises(DecodeError, match=r"65535 x 65535.*limit"):
        check_header(ds, max_pixels=50_000_000)
    ds2 = eh.wrap_jpeg_bytes(bomb)  # header agrees with the bomb
    with pytest.raises(DecodeError, match="too large"):
        check_header(ds2, max_pixels=50_000_000)


def test_jpeg_sof_dims_mismatch_header(source_bytes):
    ds = eh.wrap_jpeg_bytes(source_bytes)
    ds.Rows = 560
    with pytest.raises(DecodeError, match=r"566 x 679.*Rows=560"):
        check_header(ds, max_pixels=10**8)
    _refused(ds, "566 x 679")
    ds = eh.wrap_jpeg_bytes(source_bytes)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    _refused(ds, "components")


def test_check_header_inconsistent_values(reference):
    base = eh.native_dataset(reference)
    for keyword, value, words in [
        ("BitsAllocated", 12, "BitsAllocated"),
        ("BitsStored", 9, "BitsStored"),
        ("HighBit", 12, "HighBit"),
        ("Rows", 0, "invalid image size"),
        ("PlanarConfiguration", 2, "PlanarConfiguration"),
        ("NumberOfFrames", 0, "NumberOfFrames"),
    ]:
        ds = copy.deepcopy(base)
        setattr(ds, keyword, value)
        with pytest.raises(DecodeError, match=words):
            check_header(ds, max_pixels=10**8)
    ds = copy.deepcopy(base)
    del ds.Columns
    with pytest.raises(DecodeError, match="Columns is missing"):
        check_header(ds, max_pixels=10**8)
    ds = copy.deepcopy(base)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(DecodeError, match="Transfer Syntax"):
        check_header(ds, max_pixels=10**8)
