"""Classification and Grad-CAM in one forward pass.

``Classifier.predict`` runs the network once. A forward hook on the card's
``architecture.cam_layer`` replaces that layer's output by a detached copy that
requires grad (a graph leaf), so the backward pass of
``torch.autograd.grad(top_logits.sum(), activation)`` only runs through the
layers after it: no parameter gradients, no input gradients. Then, per image
(Selvaraju et al. 2017):

    weights_k = mean over (h, w) of d logit_top / d A_k
    cam       = ReLU(sum_k weights_k * A_k)
    cam       = bilinear upsampling (align_corners=False) to the model input grid
    cam       = cam / max(cam)         (all zeros when max(cam) <= 0)

The batch dimension is independent (eval mode: BatchNorm uses running statistics),
so a batch gives the same maps as one image at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.model.card import ModelCard
from node.model.package import find_cam_layer, load_package, resolve_device

# How the Grad-CAM values are scaled: one sentence, kept with the pipeline's result types
# (torch-free) so that the Parametric Map builder can quote it without importing torch.
from node.pipeline.result import CAM_NORMALISATION  # noqa: E402,F401


class Classifier:
    """A loaded model package: probabilities and Grad-CAM for batches of RGB uint8 images."""

    def __init__(self, card: ModelCard, model: nn.Module, device: torch.device | str = "auto"):
        self.card = card
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self._cam_module = find_cam_layer(self.model, card.architecture.cam_layer)
        rows, cols = card.input.size
        self.input_size: tuple[int, int] = (int(rows), int(cols))
        self._mean = torch.tensor(card.input.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(card.input.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # Hooks are per call; one predict at a time per Classifier.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto") -> "Classifier":
        """Load the package at ``path`` (see :func:`node.model.package.load_package`)."""
        dev = resolve_device(device)
        card, model = load_package(path, dev)
        return cls(card, model, dev)

    # ------------------------------------------------------------------ helpers

    def _tensor(self, batch: np.ndarray) -> torch.Tensor:
        """N x H x W x 3 uint8 -> normalised N x 3 x H x W float32 on the device."""
        if not isinstance(batch, np.ndarray):
            raise TypeError(f"batch must be a numpy array, got {type(batch).__name__}")
        rows, cols = self.input_size
        if batch.ndim != 4 or batch.shape[0] < 1 or batch.shape[1:] != (rows, cols, 3):
            raise ValueError(
                f"batch must be N x {rows} x {cols} x 3 (N >= 1), RGB at the card's input size; "
                f"got shape {batch.shape}"
            )
        if batch.dtype != np.uint8:
            raise ValueError(f"batch must be uint8, got {batch.dtype}")
        arr = np.ascontiguousarray(batch)
        if not arr.flags.writeable:  # torch.from_numpy wants a writable buffer
            arr = arr.copy()
        x = torch.from_numpy(arr).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    def _check_metadata(self, metadata: Sequence[dict] | None, n: int) -> Sequence[dict] | None:
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"metadata has {len(metadata)} entries for a batch of {n}")
        return metadata

    def _logits(self, x: torch.Tensor, metadata: Sequence[dict] | None) -> torch.Tensor:
        # A model that declares card.input.metadata takes it as a keyword argument;
        # the others (the demo model) ignore it.
        if self.card.input.metadata:
            return self.model(x, metadata=metadata)
        return self.model(x)

    # ------------------------------------------------------------------ API

    def predict(
        self, batch: np.ndarray, metadata: Sequence[dict] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities and the top-class Grad-CAM, in one forward pass.

        ``batch``: N x H x W x 3 uint8 RGB at ``card.input.size``.
        ``metadata``: optional, one dict per image (age, sex, site), passed through to a
        model whose card declares ``input.metadata``.

        Returns ``(probs, cams)``: probs N x C float64 (softmax, card class order);
        cams N x H x W float32 in [0, 1] for each image's top class (see
        :data:`CAM_NORMALISATION`).
        """
        store: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                raise RuntimeError(
                    f"cam_layer {self.card.architecture.cam_layer!r} must output an "
                    f"N x C x h x w tensor, got {type(output).__name__}"
                    + (f" of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else "")
                )
            act = output.detach().requires_grad_()
            store.append(act)
            return act

        with self._lock, torch.inference_mode(False), torch.enable_grad():
            x = self._tensor(batch)  # created outside any caller's inference_mode
            metadata = self._check_metadata(metadata, x.shape[0])
            handle = self._cam_module.register_forward_hook(hook)
            try:
                logits = self._logits(x, metadata)
            finally:
                handle.remove()
            if len(store) != 1:
                raise RuntimeError(
                    f"cam_layer {self.card.architecture.cam_layer!r} ran {len(store)} times in one "
                    "forward pass; it must run exactly once"
                )
            act = store[0]
            probs_t = torch.softmax(logits.detach().double(), dim=1)
            probs = probs_t.cpu().numpy()
            top = torch.from_numpy(probs.argmax(axis=1)).to(logits.device)
            selected = logits.gather(1, top[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, act)

        with torch.no_grad():
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * act.detach()).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=self.input_size, mode="bilinear", align_corners=False)[:, 0]
            peak = cam.amax(dim=(1, 2), keepdim=True)
            cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
            cams = cam.clamp_(0.0, 1.0).float().cpu().numpy()
        return probs, cams

    def forward_only(self, batch: np.ndarray, metadata: Sequence[dict] | None = None) -> np.ndarray:
        """Class probabilities only (N x C float64), under ``torch.inference_mode``."""
        x = self._tensor(batch)
        metadata = self._check_metadata(metadata, x.shape[0])
        with torch.inference_mode():
            logits = self._logits(x, metadata)
            return torch.softmax(logits.double(), dim=1).cpu().numpy()

    @property
    def class_codes(self) -> list[str]:
        return self.card.class_codes
