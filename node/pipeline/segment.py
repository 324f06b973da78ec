"""Classical lesion segmentation for dermoscopy photographs (no learning, ~15 ms).

``segment_lesion(image)`` returns a :class:`Segmentation` whose boolean mask has the
input's rows x cols. It never raises: failures come back as ``ok=False`` with a reason.

Method, on a working copy whose long side is at most ``WORK_LONG_SIDE`` (192) pixels
(integer stride + box filter); the mask returns to the input grid by a bilinear
upsample and a 0.5 threshold:

1. **Field of view.** Contact dermatoscopes leave dark vignette corners or a black
   surround outside a circular window. Outside the field of view are (a) pixels whose
   brightest channel is below ``max(0.10, 0.35 x median centre luminance)`` and that are
   connected to the image border (a 1 % frame counts as border, so a thin grey frame
   does not hide a black surround), and (b) corner pixels (outside the inscribed
   ellipse) darker than ``VIGNETTE_LEVEL`` x the centre luminance. The region is grown
   by 2 % of the image size to drop the bright halo at a circular rim.
2. **Hair suppression** (DullRazor-like): a morphological black-hat of the luminance
   (grey closing with a square of 1/40 of the short side, minus the image) marks thin
   dark structures, which are inpainted with the mean of their non-hair neighbourhood
   (normalised box filter). Dots and globules inside a lesion get inpainted too; that
   does not change the lesion's extent.
3. **Features.** A 3x3 box blur, then log space (illumination is multiplicative). Three
   candidate "lesion-ness" channels: darkness of blue, darkness of luminance, and the
   first principal component of log-RGB inside the field of view (signed: darker is
   higher). Each is thresholded with Otsu over the field of view; the candidate with
   the highest between-class separability (Otsu's eta) wins.
4. **Vignette rim.** Thresholded components that touch the field of view's edge and lie
   mostly in an 8 % band along it (or run along > 40 % of it) are vignette: they leave
   the field of view and the threshold is learnt again.
5. **Illumination flattening.** The central component of that split is a provisional
   lesion; a smooth model (quadratic in x, y plus r^4 and r^6 radial fall-off) is
   least-squares fitted to each log channel over the remaining skin and subtracted,
   removing vignetting and oblique-light gradients (skipped when < 15 % skin is left).
   Step 3's threshold is then applied to the flattened image.
6. **Morphology and selection.** Opening (0.8 % of the size) removes specks, closing
   (3 %) bridges gaps; rim components are dropped; components are scored by
   area / (1 + (d / 0.25)^2), d the centroid's normalised distance from the centre, so
   the largest component near the centre wins; holes are filled and the outline is
   smoothed (Gaussian, 1.5 % of the size, re-thresholded at 0.5).
7. **Checks**, each an ``ok=False`` reason: image too small, uniform image, no field of
   view, empty mask, mask covering (almost) the whole image or field of view, lesion too
   small (< 1 % of the image), or too little contrast: the mask's median log luminance must be
   ``MIN_DARKENING`` (0.07, i.e. ~7 %) below that of a ring of skin around it, which
   rejects skin texture without a lesion.

Known limits: a lesion paler than the skin is not found (darker is assumed); a lesion
running deep into a vignetted corner is clipped there; ring-shaped (regressing) lesions
may come back as the ring, whose bounding box is still right.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from node.pipeline.result import Segmentation

__all__ = ["segment_lesion", "WORK_LONG_SIDE", "METHOD"]

#: The working copy's long side, in pixels.
WORK_LONG_SIDE = 192
METHOD = "otsu-morphology"
#: Minimum darkening (log luminance, ~fraction) of the lesion against the skin around it;
#: skin texture alone measures 0.03-0.06 here, faint real lesions 0.09 and up.
MIN_DARKENING = 0.07
#: Mask fractions outside which the result is not a lesion.
MIN_FRACTION = 0.01
MAX_FRACTION = 0.90
#: Corner pixels darker than this fraction of the centre's median luminance are vignette.
VIGNETTE_LEVEL = 0.65
#: Vignette rim: band width along the field of view's edge (fraction of the long side),
#: the share of a component's area in that band, or the share of the edge it runs along.
RIM_BAND = 0.08
RIM_BAND_SHARE = 0.60
RIM_FRACTION = 0.40

_LUM = np.array([0.299, 0.587, 0.114], np.float32)


# --------------------------------------------------------------------------- helpers


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected rows x cols x 3 RGB, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.nan_to_num(a.astype(np.float64))
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def _downscale(image: np.ndarray, long_side: int) -> np.ndarray:
    """Cheap antialiased reduction: integer stride to ~2x the target, then a box filter."""
    h, w = image.shape[:2]
    big = max(h, w)
    if big <= long_side:
        return np.ascontiguousarray(image)
    step = big // (2 * long_side)
    if step > 1:
        image = image[::step, ::step]
        h, w = image.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BOX))


def _upscale_mask(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear upsample + 0.5 threshold (smooth edges). Above ~1 MP the bilinear step runs
    at an intermediate size and nearest-neighbour finishes (2-4 px steps, ~3x faster)."""
    if mask.shape == (rows, cols):
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    k = int(np.sqrt(rows * cols / 1.0e6))
    if k < 2:
        return np.asarray(im.resize((cols, rows), Image.Resampling.BILINEAR)) >= 128
    mid = im.resize((max(1, cols // k), max(1, rows // k)), Image.Resampling.BILINEAR)
    mid = mid.point(lambda v: 255 if v >= 128 else 0)
    return np.asarray(mid.resize((cols, rows), Image.Resampling.NEAREST)) > 0


def _square(mask: np.ndarray, radius: int, grow: bool) -> np.ndarray:
    """Binary dilation (grow) or erosion with a square; separable, O(1) in the radius."""
    if radius <= 0:
        return mask
    f = ndi.maximum_filter if grow else ndi.minimum_filter
    return f(mask, size=2 * radius + 1, mode="constant", cval=0 if grow else 1).astype(bool)


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    return _square(_square(mask, radius, grow=False), radius, grow=True)


def _border_labels(lab: np.ndarray) -> np.ndarray:
    return np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask
    outside = np.zeros(n + 1, bool)
    outside[_border_labels(lab)] = True
    outside[0] = False
    return mask | ~outside[lab]


def _otsu(values: np.ndarray, bins: int = 128) -> tuple[float, float]:
    """Otsu threshold and separability eta = sigma_between^2 / sigma_total^2."""
    lo, hi = float(values.min()), float(values.max())
    if not hi - lo > 1e-6:
        return lo, 0.0
    step = (hi - lo) / bins
    idx = np.minimum(((values - lo) * (1.0 / step)).astype(np.intp), bins - 1)
    hist = np.bincount(idx, minlength=bins).astype(np.float64)
    centres = lo + step * (np.arange(bins) + 0.5)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * w0[-1]) ** 2 / (w0 * w1)
    between = np.nan_to_num(between[:-1], nan=0.0, posinf=0.0)
    i = int(np.argmax(between))
    total = float(np.sum(hist * (centres - m0[-1] / w0[-1]) ** 2)) * w0[-1]
    eta = float(between[i] / total) if total > 0 else 0.0
    return lo + step * (i + 1), eta


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-shape constants: flattening design matrix, pixel rows/cols, corner mask."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    v = 2 * (yy + 0.5) / h - 1
    u = 2 * (xx + 0.5) / w - 1
    r2 = u * u + v * v
    design = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v, r2 * r2, r2 * r2 * r2], axis=-1)
    for a in (design, yy, xx):
        a.flags.writeable = False
    corner = r2 > 1.0
    corner.flags.writeable = False
    return design, yy.ravel(), xx.ravel(), corner


def _fail(shape: tuple[int, int], reason: str) -> Segmentation:
    return Segmentation(mask=np.zeros(shape, bool), ok=False, failure=reason, method=METHOD)


# --------------------------------------------------------------------------- steps


def _field_of_view(rgb: np.ndarray, lum: np.ndarray) -> np.ndarray:
    h, w = lum.shape
    ref = float(np.median(lum[h // 4 : h - h // 4, w // 4 : w - w // 4]))
    brightest = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    dark = brightest < max(0.10, 0.35 * ref)
    b = max(2, round(0.01 * max(h, w)))
    dark[:b] = dark[-b:] = True
    dark[:, :b] = dark[:, -b:] = True
    lab, _ = ndi.label(dark)
    border = _border_labels(lab)
    outside = np.isin(lab, border[border > 0])
    outside |= _grid(h, w)[3] & (ndi.uniform_filter(lum, 5) < VIGNETTE_LEVEL * ref)
    return ~_square(outside, max(2, round(0.02 * max(h, w))), grow=True)


def _remove_hair(rgb: np.ndarray, lum: np.ndarray) -> np.ndarray:
    h, w = lum.shape
    k = max(3, (min(h, w) // 40) | 1)
    closed = ndi.grey_closing(lum, size=(k, k))
    hair = _square(closed - lum > 0.06, 1, grow=True)
    if not hair.any():
        return rgb
    good = (~hair).astype(np.float32)
    out = rgb.copy()
    todo = hair
    for size in (k + 2, 3 * (k + 2)):  # a wider window where hairs cross
        den = ndi.uniform_filter(good, size)
        ok = todo & (den > 0.05)
        if ok.any():
            den = np.maximum(den, 1e-3)
            for c in range(3):
                num = ndi.uniform_filter(rgb[..., c] * good, size)
                out[..., c][ok] = (num / den)[ok]
        todo = todo & ~ok
        if not todo.any():
            break
    if todo.any():  # still surrounded by hair: brighten to the closed luminance
        gain = (closed / np.maximum(lum, 1e-3))[todo]
        out[todo] = np.clip(rgb[todo] * gain[:, None], 0, 1)
    return out


def _candidates(g: np.ndarray, stats: np.ndarray) -> list[np.ndarray]:
    out = [-g[..., 2], -(g @ _LUM)]
    px = g[stats]
    if len(px) > 10:
        mu = px.mean(axis=0)
        cov = np.cov((px - mu).T)
        if np.all(np.isfinite(cov)) and np.trace(cov) > 1e-12:
            v = np.linalg.eigh(cov)[1][:, -1].astype(np.float32)
            if float(v @ _LUM) > 0:
                v = -v
            out.append((g - mu.astype(np.float32)) @ v)
    return out


def _best_split(g: np.ndarray, fov: np.ndarray, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Otsu on every candidate channel; keep the most separable. Returns (mask, channel)."""
    best: tuple[float, float, np.ndarray] | None = None
    for score in _candidates(g, stats):
        t, eta = _otsu(score[stats])
        if best is None or eta > best[0]:
            best = (eta, t, score)
    _eta, t, score = best
    return (score > t) & fov, score


def _flatten(g: np.ndarray, fov: np.ndarray, lesion: np.ndarray, sub: np.ndarray) -> np.ndarray | None:
    h, w = fov.shape
    skin = fov & ~_square(lesion, max(2, round(0.02 * max(h, w))), grow=True)
    n_skin = int(skin.sum())
    if n_skin < 0.15 * fov.sum() or n_skin < 50:
        return None
    design = _grid(h, w)[0]
    sel = skin & sub
    a = design[sel].astype(np.float64)
    b = g[sel].astype(np.float64)
    try:
        coef = np.linalg.solve(a.T @ a + 1e-6 * np.eye(a.shape[1]), a.T @ b)
    except np.linalg.LinAlgError:
        return None
    return g - design @ coef.astype(np.float32)


class _Rim:
    """The field of view's edge and the band along it, for vignette-rim tests."""

    def __init__(self, fov: np.ndarray) -> None:
        h, w = fov.shape
        self.edge = fov & ~_square(fov, 1, grow=False)
        self.total = int(self.edge.sum())
        self.band = fov & _square(~fov, max(2, round(RIM_BAND * max(h, w))), grow=True)

    def components(self, lab: np.ndarray, n: int) -> np.ndarray:
        """Boolean per label (index 0 = background): is this component vignette?"""
        rim = np.zeros(n + 1, bool)
        if n == 0 or self.total == 0:
            return rim
        area = np.bincount(lab.ravel(), minlength=n + 1)
        in_band = np.bincount(lab[self.band], minlength=n + 1)
        along = np.bincount(lab[self.edge], minlength=n + 1)
        rim = (along > 0) & ((in_band >= RIM_BAND_SHARE * area) | (along > RIM_FRACTION * self.total))
        rim[0] = False
        return rim


def _central_component(mask: np.ndarray, rim: _Rim) -> tuple[np.ndarray, np.ndarray]:
    """(the best non-rim component, the union of rim components)."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask, mask
    h, w = mask.shape
    is_rim = rim.components(lab, n)
    flat = lab.ravel()
    _, yy, xx, _ = _grid(h, w)
    areas = np.bincount(flat, minlength=n + 1).astype(np.float64)
    cy = np.bincount(flat, yy, n + 1) / np.maximum(areas, 1)
    cx = np.bincount(flat, xx, n + 1) / np.maximum(areas, 1)
    d = np.hypot((cy + 0.5) / h - 0.5, (cx + 0.5) / w - 0.5)
    score = areas / (1.0 + (d / 0.25) ** 2)
    score[0] = -1
    score[is_rim] = -1
    best = int(np.argmax(score))
    rim_mask = is_rim[lab] if is_rim.any() else np.zeros_like(mask)
    if score[best] <= 0:
        return np.zeros_like(mask), rim_mask
    return lab == best, rim_mask


def _darkening(logl: np.ndarray, mask: np.ndarray, fov: np.ndarray) -> float:
    """How much darker (log luminance) the mask is than a ring of skin around it."""
    h, w = mask.shape
    ring = _square(mask, max(2, round(0.04 * max(h, w))), grow=True) & ~mask & fov
    if ring.sum() < 4:  # nothing around it to compare with
        return float("inf")
    return float(np.median(logl[ring]) - np.median(logl[mask]))


def _segment_work(rgb8: np.ndarray) -> tuple[np.ndarray | None, str]:
    h, w = rgb8.shape[:2]
    big = max(h, w)
    f = rgb8.astype(np.float32) * np.float32(1 / 255)
    lum = f @ _LUM
    fov = _field_of_view(f, lum)
    if fov.sum() < 0.10 * h * w:
        return None, "no field of view (image mostly dark)"
    if float(lum[fov].std()) < 1.5 / 255:
        return None, "uniform image (no contrast)"
    g = _remove_hair(f, lum)
    g = ndi.uniform_filter(g, size=(3, 3, 1))
    g = np.log(g + np.float32(1 / 255))
    logl = g @ _LUM
    sub = np.zeros((h, w), bool)
    sub[::2, ::2] = True
    stats = fov & sub  # statistics (PCA, Otsu) on every fourth pixel

    speck = max(1, round(0.008 * big))
    rim = _Rim(fov)
    mask, _score = _best_split(g, fov, stats)
    provisional, rim_mask = _central_component(_open(mask, speck), rim)
    if rim_mask.any():  # a dark band along the field of view's edge: vignette, not lesion
        fov = fov & ~_square(rim_mask, 2 * speck, grow=True)
        stats = stats & fov
        if fov.sum() < 0.10 * h * w or stats.sum() < 64:
            return None, "no field of view (vignette everywhere)"
        rim = _Rim(fov)
        mask, _score = _best_split(g, fov, stats)
        provisional, _ = _central_component(_open(mask, speck), rim)
    flat = _flatten(g, fov, provisional, sub)
    if flat is not None:
        flat_mask, _score = _best_split(flat, fov, stats)
        result = _finish(flat_mask, fov, rim, logl, speck)
        if result[0] is not None:
            return result
        # flattening can overcorrect (a vignetted low-contrast frame); the plain split
        # may still hold the lesion
        plain = _finish(mask, fov, rim, logl, speck)
        return plain if plain[0] is not None else result
    return _finish(mask, fov, rim, logl, speck)


def _finish(mask: np.ndarray, fov: np.ndarray, rim: _Rim, logl: np.ndarray, speck: int
            ) -> tuple[np.ndarray | None, str]:
    """Morphology, component choice, smoothing and the plausibility checks."""
    h, w = mask.shape
    big = max(h, w)
    mask = _open(mask, speck)
    lab, n = ndi.label(mask)
    is_rim = rim.components(lab, n)
    if is_rim.any():  # drop vignette pieces before the closing can merge them in
        mask &= ~is_rim[lab]
    close = max(1, round(0.03 * big))
    mask = _square(_square(mask, close, grow=True), close, grow=False) & fov
    mask, _ = _central_component(mask, rim)
    if not mask.any():
        return None, "empty mask"
    mask = _fill_holes(mask)
    mask = ndi.gaussian_filter(mask.astype(np.float32), max(1.0, 0.015 * big)) > 0.5
    lab, n = ndi.label(mask)
    if n > 1:
        mask = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    frac = float(mask.mean())
    if frac > MAX_FRACTION or mask.sum() > 0.95 * fov.sum():
        return None, "mask covers the whole image"
    if frac < MIN_FRACTION:
        return None, "lesion too small"
    darker = _darkening(logl, mask, fov)
    if darker < MIN_DARKENING:
        return None, f"no contrast: lesion {100 * darker:.0f}% darker than the skin around it"
    return mask, ""


# --------------------------------------------------------------------------- API


def segment_lesion(image: np.ndarray) -> Segmentation:
    """Segment the lesion in an RGB image; the mask has the input's rows x cols.

    Accepts rows x cols x 3 (or 4, or 2-D grey) arrays; uint8 expected, other dtypes
    are clipped to 0..255 (floats <= 1 scaled). Never raises: any failure is reported
    as ``ok=False`` with ``failure`` set and an all-False mask.
    """
    try:
        shape = np.shape(image)
    except Exception as exc:  # pragma: no cover - exotic inputs
        return _fail((0, 0), f"not an image ({exc})")
    if len(shape) not in (2, 3):
        return _fail((0, 0), f"not an image (shape {shape})")
    rows, cols = int(shape[0]), int(shape[1])
    try:
        if min(rows, cols) < 16:
            return _fail((rows, cols), f"image too small ({rows} x {cols})")
        rgb8 = _as_rgb_uint8(image)
        work = _downscale(rgb8, WORK_LONG_SIDE)
        if min(work.shape[:2]) < 16:
            return _fail((rows, cols), f"image too elongated ({rows} x {cols})")
        mask, reason = _segment_work(work)
        if mask is None:
            return _fail((rows, cols), reason)
        full = _upscale_mask(mask, rows, cols)
        if not full.any():
            return _fail((rows, cols), "empty mask")
        return Segmentation(mask=full, ok=True, failure="", method=METHOD)
    except MemoryError:
        return _fail((rows, cols), "out of memory")
    except Exception as exc:  # never raise into the pipeline
        return _fail((rows, cols), f"segmentation error: {type(exc).__name__}: {exc}")
