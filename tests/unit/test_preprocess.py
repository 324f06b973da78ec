"""frame / coarse_view: output geometry, lesion framing, fallbacks, padding, resampling."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _encode_helpers as eh  # noqa: E402

from node.model.card import InputSpec  # noqa: E402
from node.pipeline.preprocess import MIN_CROP_FRACTION, coarse_view, crop_box, frame  # noqa: E402
from node.pipeline.result import Crop  # noqa: E402
from node.pipeline.segment import segment_lesion  # noqa: E402

SKIN = np.array([220, 180, 160], np.uint8)
LESION = np.array([90, 60, 45], np.uint8)


def scene(h: int, w: int, cy: float, cx: float, r: float) -> tuple[np.ndarray, np.ndarray]:
    """Skin-coloured frame with a dark disc; returns (rgb, disc mask)."""
    yy, xx = np.indices((h, w))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = np.empty((h, w, 3), np.uint8)
    img[:] = SKIN
    img[disc] = LESION
    return img, disc


def inside(crop: Crop, box: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = box
    return crop.x0 <= x0 and crop.y0 <= y0 and crop.x1 >= x1 and crop.y1 >= y1


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("framing", ["lesion-crop", "center-crop", "resize"])
@pytest.mark.parametrize("size", [(224, 224), (240, 320)])
@pytest.mark.parametrize("shape", [(566, 679), (768, 576), (37, 53)])
def test_output_shape_and_dtype(framing, size, shape):
    img, disc = scene(*shape, shape[0] / 2, shape[1] / 2, min(shape) / 6)
    out, crop = frame(img, InputSpec(size=size, framing=framing), disc)
    assert out.shape == (*size, 3)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    assert isinstance(crop, Crop)
    if framing == "resize":
        assert (crop.x0, crop.y0, crop.x1, crop.y1) == (0, 0, shape[1], shape[0])
    else:
        assert crop.width == crop.height  # square crops


def test_rejects_non_rgb():
    spec = InputSpec()
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(ValueError):
            frame(bad, spec, None)


# ---------------------------------------------------------------- lesion crop


def test_lesion_crop_contains_lesion_with_margin():
    img, disc = scene(1200, 1600, 600, 800, 200)
    spec = InputSpec(framing="lesion-crop", crop_margin=0.25)
    out, crop = frame(img, spec, disc)
    assert crop.method == "lesion-crop" and not crop.padded
    assert inside(crop, bbox(disc))
    assert crop.width == pytest.approx(401 * 1.5, abs=2)  # larger side x (1 + 2 margin)
    assert crop.x0 + crop.width / 2 == pytest.approx(800, abs=1)
    # the lesion fills the middle of the model input: dark centre, skin corners
    assert out[112, 112].astype(int).sum() < 300
    assert np.abs(out[2, 2].astype(int) - SKIN).max() < 10


def test_small_lesion_gets_minimum_crop():
    img, disc = scene(1000, 1500, 500, 750, 20)
    _, crop = frame(img, InputSpec(framing="lesion-crop"), disc)
    assert crop.width == round(MIN_CROP_FRACTION * 1000)
    assert inside(crop, bbox(disc))


@pytest.mark.parametrize("cy, cx", [(120, 150), (880, 1350), (120, 1350), (500, 90)])
def test_off_centre_lesion_is_inside_the_crop(cy, cx):
    img, disc = scene(1000, 1500, cy, cx, 80)
    out, crop = frame(img, InputSpec(framing="lesion-crop", crop_margin=0.5), disc)
    assert inside(crop, bbox(disc))
    assert not crop.padded  # shifted inside the frame rather than padded
    assert 0 <= crop.x0 and crop.x1 <= 1500 and 0 <= crop.y0 and crop.y1 <= 1000
    dark = (out.astype(int).sum(axis=2) < 400).sum()
    expected = np.pi * 80**2 * (224 / crop.width) ** 2
    assert dark == pytest.approx(expected, rel=0.15)  # the whole disc made it into the input


def test_coarse_mask_on_another_grid():
    """A mask from the coarse view (another grid, same aspect) maps back to source pixels."""
    img, disc = scene(1296, 1936, 300, 1500, 120)
    small, scale = coarse_view(img, 256)
    coarse = np.asarray(Image.fromarray(disc).resize(small.shape[1::-1], Image.Resampling.NEAREST))
    _, crop = frame(img, InputSpec(framing="lesion-crop"), coarse)
    x0, y0, x1, y1 = bbox(disc)
    slack = 1 / scale
    assert crop.x0 <= x0 + slack and crop.y0 <= y0 + slack
    assert crop.x1 >= x1 - slack and crop.y1 >= y1 - slack


@pytest.mark.parametrize(
    "mask", [None, "empty", "full"], ids=["none", "empty", "full"]
)
def test_fallback_to_center_crop(mask):
    img, disc = scene(600, 900, 300, 450, 60)
    m = {None: None, "empty": np.zeros_like(disc), "full": np.ones_like(disc)}[mask]
    out, crop = frame(img, InputSpec(framing="lesion-crop"), m)
    assert crop == Crop(150, 0, 750, 600, "center-crop", False)
    assert out.shape == (224, 224, 3)


def test_center_crop_ignores_mask():
    img, disc = scene(900, 600, 100, 100, 50)
    _, crop = frame(img, InputSpec(framing="center-crop"), disc)
    assert crop == Crop(0, 150, 600, 750, "center-crop", False)


def test_padding_with_edge_replication():
    """A lesion wider than the frame is tall: the square sticks out and is edge-padded."""
    h, w = 400, 1600
    img = np.empty((h, w, 3), np.uint8)
    img[:] = SKIN
    img[:30, :] = (255, 0, 0)  # top edge red
    img[-30:, :] = (0, 0, 255)  # bottom edge blue
    lesion = np.zeros((h, w), bool)
    lesion[150:250, 200:1400] = True
    img[lesion] = LESION
    out, crop = frame(img, InputSpec(framing="lesion-crop", crop_margin=0.1), lesion)
    assert crop.padded and crop.y0 < 0 and crop.y1 > h
    assert crop.width == crop.height and crop.width > h
    assert inside(crop, bbox(lesion))
    # replicated edges: top rows red, bottom rows blue, no black padding anywhere
    assert out[:20, :, 0].mean() > 200 and out[:20, :, 2].mean() < 60
    assert out[-20:, :, 2].mean() > 200 and out[-20:, :, 0].mean() < 60
    assert out.reshape(-1, 3).sum(axis=1).min() > 100


def test_crop_box_never_exceeds_long_side():
    m = np.ones((100, 300), bool)
    m[:, :] = False
    m[10:90, 0:300] = True
    crop = crop_box((1000, 3000), InputSpec(framing="lesion-crop", crop_margin=2.0), m)
    assert crop.width <= 3000


# ---------------------------------------------------------------- resampling


def test_geometry_is_exact_through_reduce_and_padding():
    """Values that encode x position land where the crop box says, after integer reduce."""
    h, w = 2400, 3600
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.float64), (h, 1))
    img = np.repeat(np.rint(ramp)[..., None], 3, axis=2).astype(np.uint8)
    for lesion_box, expect_pad in [((1000, 1000, 1600, 1500), False), ((100, 1100, 3500, 1300), True)]:
        m = np.zeros((h, w), bool)
        x0, y0, x1, y1 = lesion_box
        m[y0:y1, x0:x1] = True
        out, crop = frame(img, InputSpec(framing="lesion-crop", crop_margin=0.1), m)
        assert crop.padded == expect_pad
        cols = crop.x0 + (np.arange(224) + 0.5) * crop.width / 224
        expected = np.clip(cols, 0, w - 1) * 255 / (w - 1)
        got = out[112, :, 0].astype(float)
        assert np.abs(got[5:-5] - expected[5:-5]).max() < 2.0


def test_resize_is_antialiased():
    """A 1-pixel checkerboard must average to grey, not alias into stripes."""
    yy, xx = np.indices((1500, 2000))
    board = (((yy + xx) % 2) * 255).astype(np.uint8)
    img = np.repeat(board[..., None], 3, axis=2)
    out, _ = frame(img, InputSpec(framing="resize"), None)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 3
    # coarse_view trades exactness for speed (integer stride first): it only has to
    # follow image content at the lesion scale, not 1-pixel patterns
    yy, xx = np.indices((1500, 2000))
    smooth = np.repeat((127 + 100 * np.sin(xx / 60.0) * np.cos(yy / 45.0)).astype(np.uint8)[..., None], 3, 2)
    small, _ = coarse_view(smooth)
    ref = np.asarray(Image.fromarray(smooth).resize(small.shape[1::-1], Image.Resampling.LANCZOS))
    assert np.abs(small.astype(int) - ref).mean() < 3


def test_resize_matches_pillow_lanczos():
    rgb = eh.fixture_rgb("ISIC_0000552.jpg") if eh.fixtures_available() else scene(566, 679, 280, 340, 90)[0]
    out, _ = frame(rgb, InputSpec(framing="resize", size=(200, 300)), None)
    ref = np.asarray(Image.fromarray(rgb).resize((300, 200), Image.Resampling.LANCZOS))
    assert np.abs(out.astype(int) - ref).mean() < 2


def test_coarse_view():
    img, _ = scene(2592, 3872, 1296, 1936, 400)
    small, scale = coarse_view(img, 256)
    assert small.shape == (171, 256, 3) and small.dtype == np.uint8
    assert scale == pytest.approx(256 / 3872)
    tiny, s = coarse_view(img[:100, :120], 256)
    assert tiny.shape == (100, 120, 3) and s == 1.0  # never upscales


# ---------------------------------------------------------------- real frame, speed


@pytest.mark.skipif(not eh.fixtures_available(), reason=f"shared fixtures not found at {eh.FIXTURES}")
def test_full_frame_path_on_fixture():
    img = eh.fixture_rgb("ISIC_0000504.jpg")  # 3872 x 2592
    small, scale = coarse_view(img)
    seg = segment_lesion(small)
    assert seg.ok, seg.failure
    t0 = time.process_time()
    out, crop = frame(img, InputSpec(), seg.mask)
    cpu_ms = (time.process_time() - t0) * 1000
    assert out.shape == (224, 224, 3) and crop.method == "lesion-crop"
    x0, y0, x1, y1 = bbox(seg.mask)
    assert inside(crop, (int(x0 / scale), int(y0 / scale), int(x1 / scale) - 1, int(y1 / scale) - 1))
    assert cpu_ms < 150  # ~15-30 ms when idle
