"""PNG previews for people: the model input, and the same with the Grad-CAM overlay and the lesion outline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from node.pipeline.result import Evidence


def _jet(x: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map, x in [0, 1] -> RGB uint8 (written out to avoid matplotlib)."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def render(evidence: Evidence, scale: int = 2) -> Image.Image:
    img = evidence.model_input.astype(np.float32)
    heat = _jet(evidence.cam).astype(np.float32)
    alpha = (0.25 + 0.35 * evidence.cam)[..., None]
    overlay = (img * (1 - alpha) + heat * alpha).astype(np.uint8)
    mask = evidence.segmentation.mask
    if mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=1)
        edge = ndimage.binary_dilation(edge, iterations=1)
        overlay[edge] = (0, 255, 0)
    h, w = img.shape[:2]
    band = 34
    canvas = Image.new("RGB", (2 * w * scale, h * scale + band), (0, 0, 0))
    canvas.paste(Image.fromarray(evidence.model_input).resize((w * scale, h * scale), Image.Resampling.NEAREST), (0, 0))
    canvas.paste(Image.fromarray(overlay).resize((w * scale, h * scale), Image.Resampling.BILINEAR), (w * scale, 0))
    draw = ImageDraw.Draw(canvas)
    top = evidence.top_class
    p = float(evidence.probabilities[evidence.top_index])
    seg = "lesion outline (green)" if evidence.segmentation.ok else f"segmentation failed: {evidence.segmentation.failure}"
    card = evidence.card
    draw.text((4, h * scale + 2), f"{top.display} p={p:.2f} | Grad-CAM overlay | {seg}", fill=(255, 255, 255))
    draw.text((4, h * scale + 17), f"{card.model.name} {card.model.version}: {card.label}", fill=(255, 200, 0))
    return canvas


def write_png(evidence: Evidence, path: Path) -> Path:
    render(evidence).save(path, format="PNG")
    return path
