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
"""

from __future__ import annotations

import copy
import re

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


def build(name: str, num_classes: int) -> nn.Module:
    """Return an untrained ``nn.Module`` for architecture ``name`` with ``num_classes`` outputs."""
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
