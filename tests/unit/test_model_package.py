"""Model package loading: the shipped package loads; every kind of broken package is refused
with a CardError that names the file (and the field); no pickle anywhere in node/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from node.model.architectures import build
from node.model.card import CardError, read_card
from node.model.classifier import Classifier
from node.model.package import load_package

from ._model_helpers import PACKAGE, REPO, copy_package


def _edit_card(pkg: Path, old: str, new: str) -> None:
    p = pkg / "card.toml"
    text = p.read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not in card"
    p.write_text(text.replace(old, new, 1), encoding="utf-8")


def _edit_weights(pkg: Path, edit) -> None:
    p = pkg / "weights.safetensors"
    state = load_file(str(p))
    edit(state)
    save_file(state, str(p))


# ------------------------------------------------------------------ the shipped package


def test_shipped_package_loads():
    card, model = load_package(PACKAGE, device="cpu")
    assert card.model.name == "derm-effnetlite0-ham7"
    assert card.architecture.name == "efficientnet_lite0"
    assert card.class_codes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert {c.code for c in card.classes if c.malignant} == {"akiec", "bcc", "mel"}
    assert card.input.size == (224, 224)
    assert card.model.demo and "Not for diagnostic use" in card.model.intended_use
    assert "CC BY-NC-SA" in card.training.licence and "non-commercial" in card.training.licence
    assert card.model.uid.startswith("2.25.")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).device.type == "cpu"
    assert model.get_submodule(card.architecture.cam_layer) is not None


def test_shipped_weights_are_float32_safetensors():
    state = load_file(str(PACKAGE / "weights.safetensors"))
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)


def test_classifier_on_shipped_package():
    clf = Classifier.load(PACKAGE, device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    probs, cams = clf.predict(x)
    assert probs.shape == (2, 7) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert cams.shape == (2, 224, 224) and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    with pytest.raises(ValueError, match="224 x 224 x 3"):
        clf.predict(x[:, :200])
    with pytest.raises(ValueError, match="uint8"):
        clf.predict(x.astype(np.float32))
    with pytest.raises(ValueError, match="metadata"):
        clf.predict(x, metadata=[{}])


# ------------------------------------------------------------------ refusals


def test_missing_directory(tmp_path):
    with pytest.raises(CardError, match="not a directory"):
        load_package(tmp_path / "nope")


def test_missing_card(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    (pkg / "card.toml").unlink()
    with pytest.raises(CardError, match=r"card not found: .*card\.toml"):
        load_package(pkg)


def test_invalid_toml(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    (pkg / "card.toml").write_text("[model\nname = ", encoding="utf-8")
    with pytest.raises(CardError, match=r"card\.toml is not valid TOML"):
        load_package(pkg)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('framing = "lesion-crop"', 'framing = "zoom"', "input.framing"),
        ('snomed = "93655004"', 'snomed = "melanoma"', "classes.4.snomed"),
        ('version = "', 'colour = "red"\nversion = "', "model.colour"),
        ("size = [224, 224]", 'size = "big"', "input.size"),
    ],
)
def test_wrong_field_is_named(tmp_path, old, new, field):
    pkg = copy_package(tmp_path / "pkg")
    _edit_card(pkg, old, new)
    with pytest.raises(CardError) as exc:
        load_package(pkg)
    assert field in str(exc.value)
    assert "card.toml" in str(exc.value)


def test_unknown_architecture(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    _edit_card(pkg, 'name = "efficientnet_lite0"', 'name = "efficientnet_lite9"')
    with pytest.raises(CardError, match=r"card\.toml.*unknown architecture 'efficientnet_lite9'"):
        load_package(pkg)
    with pytest.raises(CardError, match="unknown architecture"):
        build("definitely_not_a_model", 7)


def test_torchvision_architecture_builds():
    model = build("resnet18", 3)
    assert model.fc.out_features == 3


def test_missing_weights(tmp_path):
    pkg = copy_package(tmp_path / "pkg", weights=False)
    with pytest.raises(CardError, match=r"weights not found: .*weights\.safetensors"):
        load_package(pkg)


def test_truncated_weights(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    p = pkg / "weights.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CardError, match=r"weights\.safetensors are not a readable safetensors file"):
        load_package(pkg)


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"PK\x03\x04 a zip, as torch.save writes"])
def test_corrupt_weights(tmp_path, content):
    pkg = copy_package(tmp_path / "pkg")
    (pkg / "weights.safetensors").write_bytes(content)
    with pytest.raises(CardError, match=r"weights\.safetensors are not a readable safetensors file"):
        load_package(pkg)


def test_shape_mismatch_from_card_class_count(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    text = (pkg / "card.toml").read_text(encoding="utf-8")
    # drop the last [[classes]] table: the card now says 6 classes, the weights hold 7
    start = text.rindex("[[classes]]")
    end = text.index("\n[", start + 1)
    (pkg / "card.toml").write_text(text[:start] + text[end + 1 :], encoding="utf-8")
    assert len(read_card(pkg).classes) == 6
    with pytest.raises(CardError, match=r"shape mismatch.*_fc\.weight: file \(7, 1280\) vs model \(6, 1280\)"):
        load_package(pkg)


def test_shape_mismatch_in_weights(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    _edit_weights(pkg, lambda s: s.__setitem__("_fc.bias", torch.zeros(8)))
    with pytest.raises(CardError, match=r"weights\.safetensors do not match.*_fc\.bias"):
        load_package(pkg)


def test_missing_key(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    _edit_weights(pkg, lambda s: s.pop("_conv_head.weight"))
    with pytest.raises(CardError, match=r"1 missing tensor\(s\): _conv_head\.weight"):
        load_package(pkg)


def test_unexpected_key(tmp_path):
    pkg = copy_package(tmp_path / "pkg")
    _edit_weights(pkg, lambda s: s.__setitem__("extra.head.weight", torch.zeros(3)))
    with pytest.raises(CardError, match=r"1 unexpected tensor\(s\): extra\.head\.weight"):
        load_package(pkg)


def test_non_finite_weights(tmp_path):
    pkg = copy_package(tmp_path / "pkg")

    def poison(s):
        s["_fc.weight"] = s["_fc.weight"].clone()
        s["_fc.weight"][0, 0] = float("nan")

    _edit_weights(pkg, poison)
    with pytest.raises(CardError, match=r"NaN or infinite.*_fc\.weight"):
        load_package(pkg)


@pytest.mark.parametrize("layer", ["_head_actt", "_blocks.99", "_bn1.weight.x", ""])
def test_unknown_cam_layer(tmp_path, layer):
    pkg = copy_package(tmp_path / "pkg")
    card = read_card(pkg)
    _edit_card(pkg, f'cam_layer = "{card.architecture.cam_layer}"', f'cam_layer = "{layer}"')
    with pytest.raises(CardError, match=r"card\.toml.*architecture\.cam_layer"):
        load_package(pkg)


# ------------------------------------------------------------------ no pickle in node/

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _pickle_uses(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLE_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append(f"{where} from torch import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if re.fullmatch(r"(torch\.)?(jit\.)?load|torch\.hub\.load(_state_dict_from_url)?", name) and name != "load":
                found.append(f"{where} {name}(...)")
            if name.endswith("load") and any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                found.append(f"{where} {name}(allow_pickle=...)")
    return found


def test_no_pickle_in_node():
    files = sorted((REPO / "node").rglob("*.py"))
    assert len(files) >= 3
    found = [hit for f in files for hit in _pickle_uses(f)]
    assert not found, "pickle-based loading in node/: " + "; ".join(found)


def test_pickle_scanner_detects(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import pickle\nimport torch\nx = torch.load('w.pt')\nfrom torch import load\n"
        "import numpy as np\ny = np.load('a.npy', allow_pickle=True)\n"
        "# torch.load( in a comment is fine\nz = np.load('b.npy')\n",
        encoding="utf-8",
    )
    hits = _pickle_uses(probe, tmp_path)
    assert len(hits) == 4, hits
