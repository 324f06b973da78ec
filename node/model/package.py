"""Load a model package (``card.toml`` + ``weights.safetensors``) without pickle.

``load_package`` checks everything it can before the model is used, and every
problem is a :class:`~node.model.card.CardError` whose message names the file:

* the package directory, the card (missing, not TOML, a wrong field: see ``read_card``);
* the weights file: missing, not a safetensors file (truncated, corrupt), missing or
  unexpected tensors, a shape mismatch, non-finite values;
* the Grad-CAM layer named by ``architecture.cam_layer``.

Weights are read with ``safetensors.torch.load_file`` only: no ``torch.load``, no pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from node.model.architectures import build
from node.model.card import WEIGHTS_FILE, CardError, ModelCard, read_card


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as torch.device."""
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "", "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"not a torch device: {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def find_cam_layer(model: nn.Module, dotted: str, where: str = "") -> nn.Module:
    """The submodule at dotted path ``dotted``; CardError when there is none."""
    if not dotted or not dotted.strip():
        raise CardError(f"{where}architecture.cam_layer is empty; name a submodule, e.g. '_head_act'")
    try:
        return model.get_submodule(dotted)
    except AttributeError as exc:
        top = ", ".join(n for n, _ in model.named_children())
        raise CardError(
            f"{where}architecture.cam_layer {dotted!r} is not a submodule of the model "
            f"({exc}); top-level modules are: {top}"
        ) from exc


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CardError(f"model weights not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ... : all mean "unusable file"
        raise CardError(
            f"model weights {path} are not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}")
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:8])}")
    kinds = [
        k
        for k, v in expected.items()
        if k in state and v.is_floating_point() != state[k].is_floating_point()
    ]
    if kinds:
        problems.append(f"float/integer dtype mismatch: {', '.join(kinds[:8])}")
    if problems:
        raise CardError(
            f"model weights {path} do not match the card's architecture "
            f"({len(expected)} tensors expected): " + " | ".join(problems)
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CardError(f"model weights {path} hold NaN or infinite values in: {', '.join(bad[:8])}")


def load_package(path: str | Path, device: str | torch.device = "auto") -> tuple[ModelCard, nn.Module]:
    """Read the card, build the architecture, load and check the weights.

    Returns ``(card, model)``: the model on ``device`` (``"auto"``: cuda if available,
    else cpu), in eval mode, every parameter with ``requires_grad=False``.
    """
    root = Path(path)
    if not root.is_dir():
        raise CardError(f"model package not found (not a directory): {root}")
    card = read_card(root)
    where = f"model card {root / 'card.toml'}: "
    try:
        model = build(card.architecture.name, len(card.classes), card.input.metadata)
    except CardError as exc:
        raise CardError(f"{where}{exc}") from exc
    find_cam_layer(model, card.architecture.cam_layer, where)
    weights = root / WEIGHTS_FILE
    state = _read_weights(weights)
    _check_state(model, state, weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # pragma: no cover - _check_state catches these first
        raise CardError(f"model weights {weights} could not be loaded: {exc}") from exc
    model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    return card, model
