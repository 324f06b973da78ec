"""Grad-CAM of node.model.classifier against captum's LayerGradCam, on the shipped model
and real training images; batch vs single image; predict vs forward_only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from node.model.card import ModelCard
from node.model.classifier import CAM_NORMALISATION, Classifier

from ._model_helpers import DATA, NO_SHARED, PACKAGE, some_train_images

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=NO_SHARED)


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier.load(PACKAGE, device="cpu")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return some_train_images(4)


def captum_cams(clf: Classifier, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    from captum.attr import LayerAttribution, LayerGradCam

    layer = clf.model.get_submodule(clf.card.architecture.cam_layer)
    x = clf._tensor(images)
    gc = LayerGradCam(clf.model, layer)
    attr = gc.attribute(x, target=[int(t) for t in targets], relu_attributions=True)
    up = LayerAttribution.interpolate(attr, tuple(clf.input_size), interpolate_mode="bilinear")[:, 0]
    peak = up.amax(dim=(1, 2), keepdim=True)
    up = torch.where(peak > 0, up / peak, torch.zeros_like(up))
    return up.detach().cpu().numpy()


def test_matches_captum(clf, images):
    probs, cams = clf.predict(images)
    ref = captum_cams(clf, images, probs.argmax(axis=1))
    assert cams.shape == ref.shape == (len(images), 224, 224)
    assert np.abs(cams - ref).max() < 1e-4
    # a real map, not a blank or a constant
    for cam in cams:
        assert cam.max() == pytest.approx(1.0) and cam.min() >= 0.0
        assert (cam < 0.5).mean() > 0.05


def test_captum_comparison_can_fail(clf, images):
    """The comparison above is sensitive: another class's map differs from the top class's."""
    probs, cams = clf.predict(images)
    other = (probs.argmax(axis=1) + 1) % probs.shape[1]
    ref = captum_cams(clf, images, other)
    assert np.abs(cams - ref).max() > 1e-2


def test_batch_equals_single(clf, images):
    probs, cams = clf.predict(images)
    for i in range(len(images)):
        p1, c1 = clf.predict(images[i : i + 1])
        np.testing.assert_allclose(p1[0], probs[i], atol=1e-6)
        assert np.abs(c1[0] - cams[i]).max() < 1e-4


def test_probabilities_equal_forward_only(clf, images):
    probs, _ = clf.predict(images)
    np.testing.assert_allclose(clf.forward_only(images), probs, rtol=0, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


def test_no_parameter_or_input_gradients(clf, images):
    clf.predict(images[:1])
    assert all(p.grad is None and not p.requires_grad for p in clf.model.parameters())


def test_inside_inference_mode_and_metadata(clf, images):
    probs, cams = clf.predict(images[:2])
    with torch.inference_mode():
        p2, c2 = clf.predict(images[:2], metadata=[{"age": 50}, {"sex": "F"}])
    np.testing.assert_array_equal(p2, probs)
    np.testing.assert_array_equal(c2, cams)


def test_normalisation_text():
    assert "Grad-CAM" in CAM_NORMALISATION and "maximum" in CAM_NORMALISATION


# ---------------------------------------------------------------- a tiny hand-checkable model


class _Tiny(nn.Module):
    """feature map = the input's first 2 channels, 8x8 average-pooled; linear head."""

    def __init__(self, head: torch.Tensor):
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.feat = nn.Identity()
        self.fc = nn.Linear(2, head.shape[0], bias=False)
        self.fc.weight.data.copy_(head)

    def forward(self, x):
        a = self.feat(self.pool(x[:, :2]))
        return self.fc(a.mean(dim=(2, 3)))


def _tiny_card() -> ModelCard:
    return ModelCard.model_validate(
        {
            "model": {"name": "tiny", "version": "1", "uid": "2.25.1", "intended_use": "test"},
            "architecture": {"name": "efficientnet_lite0", "cam_layer": "feat"},
            "input": {"size": (32, 32), "mean": (0, 0, 0), "std": (1, 1, 1)},
            "classes": [
                {"code": c, "display": c, "snomed": "123456", "snomed_meaning": c} for c in ("a", "b")
            ],
        }
    )


def test_tiny_model_by_hand():
    head = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    clf = Classifier(_tiny_card(), _Tiny(head), "cpu")
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, :16, :, 0] = 255  # red on the top half: class a wins
    probs, cams = clf.predict(img)
    # logits: a = mean(red) = 0.5, b = 0: softmax by hand
    assert probs[0, 0] == pytest.approx(np.exp(0.5) / (np.exp(0.5) + 1.0))
    # cam = relu(d logit_a / d A_red * A_red) ∝ A_red: 1 on the top half, 0 below, bilinear between
    act = torch.zeros(1, 1, 8, 8)
    act[..., :4, :] = 1.0
    ref = F.interpolate(act, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(cams[0], ref / ref.max(), atol=1e-6)


def test_tiny_model_negative_cam_is_zero():
    head = torch.tensor([[-1.0, 0.0], [-2.0, 0.0]])  # every class's evidence is negative
    clf = Classifier(_tiny_card(), _Tiny(head), "cpu")
    img = np.full((2, 32, 32, 3), 200, np.uint8)
    probs, cams = clf.predict(img)
    assert probs.argmax(axis=1).tolist() == [0, 0]
    assert cams.dtype == np.float32 and not cams.any()
