"""Build a classification network by architecture name (no weights loaded here).

Supported names:

* ``efficientnet_lite0`` .. ``efficientnet_lite4``: EfficientNet-Lite from the
  ``efficientnet-lite-pytorch`` package. The network gets one extra, parameter-free
  module, ``_head_act``: the activation after the head convolution (``_conv_head`` ->
  ``_bn1`` -> ``_head_act``). Upstream applies one shared ``_swish`` module both in the
  stem and in the head, so a hook on it would fire twice; ``_head_act`` is the final
  feature map before global pooling and is the natural Grad-CAM target. The state
  dict is unchanged (ReLU6 has no parameters).
* any torchvision classification builder name (``resnet18``, ``mobilenet_v3_small``,
  ``efficientnet_b0``, ...), built with ``weights=None``.

Unknown names raise :class:`~node.model.card.CardError`.

A card that declares ``input.metadata`` (any of ``age``, ``sex``, ``site``) gets the
network wrapped in :class:`MetadataFusion`: image logits plus a learned linear term on
the encoded metadata (state-dict keys ``backbone.*`` and ``meta.*``; the Grad-CAM layer
is then ``backbone.<layer>``).
"""

from __future__ import annotations

import copy
import re
from typing import Sequence

import torch
from torch import nn

from node.model.card import CardError

_LITE = re.compile(r"^efficientnet_lite[0-4]$")


def _efficientnet_lite(name: str, num_classes: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise CardError(
            f"architecture {name!r} needs the package efficientnet-lite-pytorch: {exc}"
        ) from exc

    class EfficientNetLite(EfficientNet):
        """EfficientNet-Lite with a distinct head activation module ``_head_act``."""

        def __init__(self, blocks_args=None, global_params=None):
            super().__init__(blocks_args, global_params)
            self._head_act = copy.deepcopy(self._swish)

        def extract_features(self, inputs):
            x = self._swish(self._bn0(self._conv_stem(inputs)))
            for idx, block in enumerate(self._blocks):
                rate = self._global_params.drop_connect_rate
                if rate:
                    rate *= float(idx) / len(self._blocks)
                x = block(x, drop_connect_rate=rate)
            return self._head_act(self._bn1(self._conv_head(x)))

    return EfficientNetLite.from_name(name.replace("_", "-"), num_classes=num_classes)


def torchvision_names() -> list[str]:
    """Classification builders torchvision knows (empty if torchvision is missing)."""
    try:
        import torchvision.models as tvm
    except ImportError:  # pragma: no cover
        return []
    try:
        return sorted(tvm.list_models(module=tvm))
    except Exception:  # pragma: no cover - very old torchvision
        return []


#: Anatomic site buckets for metadata encoding (SNOMED CT codes from CID 4029), then "other".
SITE_CODES = (
    "89545001", "41695006", "45048000",  # face, scalp, neck
    "77568009", "43799004", "818983003",  # back, thorax, abdomen
    "302538001", "14975008", "85562004",  # upper arm, forearm, hand
    "68367000", "30021000", "56459004",  # thigh, lower leg, foot
)
_WIDTH = {"age": 2, "sex": 3, "site": len(SITE_CODES) + 1}


def metadata_width(fields: Sequence[str]) -> int:
    return sum(_WIDTH[f] for f in fields)


def encode_metadata(metadata: Sequence[dict] | None, fields: Sequence[str], n: int) -> torch.Tensor:
    """One row per image: age -> (years/100, known); sex -> one-hot M/F/O (zeros if unknown);
    site -> one-hot over SITE_CODES + other (zeros if unknown)."""
    out = torch.zeros((n, metadata_width(fields)), dtype=torch.float32)
    for i in range(n):
        m = (metadata[i] if metadata is not None else None) or {}
        col = 0
        for f in fields:
            if f == "age" and m.get("age") is not None:
                out[i, col], out[i, col + 1] = float(m["age"]) / 100.0, 1.0
            elif f == "sex" and m.get("sex") in ("M", "F", "O"):
                out[i, col + ("M", "F", "O").index(m["sex"])] = 1.0
            elif f == "site" and m.get("site"):
                code = m["site"][0] if isinstance(m["site"], (tuple, list)) else str(m["site"])
                out[i, col + (SITE_CODES.index(code) if code in SITE_CODES else len(SITE_CODES))] = 1.0
            col += _WIDTH[f]
    return out


class MetadataFusion(nn.Module):
    """logits = backbone(image) + meta(encoded metadata)."""

    def __init__(self, backbone: nn.Module, fields: Sequence[str], num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fields = tuple(fields)
        self.meta = nn.Linear(metadata_width(self.fields), num_classes)

    def forward(self, x: torch.Tensor, metadata: Sequence[dict] | None = None) -> torch.Tensor:
        m = encode_metadata(metadata, self.fields, x.shape[0]).to(x.device, x.dtype)
        return self.backbone(x) + self.meta(m)


def build(name: str, num_classes: int, metadata: Sequence[str] = ()) -> nn.Module:
    """Return an untrained ``nn.Module`` for architecture ``name`` with ``num_classes`` outputs
    (wrapped in :class:`MetadataFusion` when ``metadata`` fields are given)."""
    if metadata:
        unknown = [f for f in metadata if f not in _WIDTH]
        if unknown:
            raise CardError(f"unknown metadata input {unknown[0]!r}: expected age, sex or site")
        return MetadataFusion(build(name, num_classes), metadata, num_classes)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise CardError(f"architecture {name!r}: need at least 2 classes, got {num_classes!r}")
    if _LITE.match(name):
        return _efficientnet_lite(name, num_classes)
    known = torchvision_names()
    if name in known:
        import torchvision.models as tvm

        try:
            return tvm.get_model(name, weights=None, num_classes=num_classes)
        except Exception as exc:
            raise CardError(f"architecture {name!r} could not be built: {exc}") from exc
    raise CardError(
        f"unknown architecture {name!r}: expected efficientnet_lite0..efficientnet_lite4 "
        f"or a torchvision classification model name (e.g. resnet18, efficientnet_b0)"
    )
