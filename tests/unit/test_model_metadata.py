"""A model package that uses DICOM metadata (age, sex, site): the format allows it and the
pipeline passes PatientAge, PatientSex and AnatomicRegionSequence through to it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from node.model.architectures import SITE_CODES, build, encode_metadata
from node.model.card import CardError
from node.model.classifier import Classifier
from node.pipeline.process import read_metadata

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "derm-effnetlite0-ham7"


@pytest.fixture(scope="module")
def meta_package(tmp_path_factory):
    d = tmp_path_factory.mktemp("meta-model")
    card = (SHIPPED / "card.toml").read_text()
    card = card.replace('name = "derm-effnetlite0-ham7"', 'name = "derm-meta-test"')
    card = card.replace("metadata = []", 'metadata = ["age", "sex", "site"]')
    card = card.replace('cam_layer = "_head_act"', 'cam_layer = "backbone._head_act"')
    (d / "card.toml").write_text(card)
    model = build("efficientnet_lite0", 7, ("age", "sex", "site"))
    from safetensors.torch import load_file

    model.backbone.load_state_dict(load_file(SHIPPED / "weights.safetensors"))
    with torch.no_grad():
        model.meta.weight.zero_()
        model.meta.bias.zero_()
        model.meta.weight[4, 0] = 20.0  # age pushes towards class 4 (mel)
        model.meta.weight[0, 3] = 10.0  # male pushes towards class 0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "weights.safetensors")
    return d


def test_encoding():
    e = encode_metadata([{"age": 50.0, "sex": "F", "site": ("77568009", "SCT", "Back")}, {}], ("age", "sex", "site"), 2)
    assert e.shape == (2, 2 + 3 + len(SITE_CODES) + 1)
    assert e[0, 0] == 0.5 and e[0, 1] == 1 and e[0, 3] == 1 and e[0, 5 + SITE_CODES.index("77568009")] == 1
    assert float(e[1].abs().sum()) == 0.0


def test_unknown_metadata_field_is_a_card_error():
    with pytest.raises(CardError, match="unknown metadata input"):
        build("efficientnet_lite0", 7, ("weight",))


def test_metadata_changes_the_prediction(meta_package):
    clf = Classifier.load(meta_package, device="cpu")
    img = np.full((1, 224, 224, 3), 128, np.uint8)
    young, _ = clf.predict(img, [{"age": 5.0}])
    old, cam = clf.predict(img, [{"age": 95.0}])
    assert old[0, 4] > young[0, 4] + 0.2
    male, _ = clf.predict(img, [{"sex": "M"}])
    assert male[0, 0] > young[0, 0]
    assert cam.shape == (1, 224, 224)


def test_pipeline_passes_dicom_metadata(meta_package, tmp_path):
    from tests.peers import FIXTURES, require_shared

    require_shared()
    from node.dicomize import wrap_jpeg
    from node.pipeline.process import ProcessOptions, process

    clf = Classifier.load(meta_package, device="cpu")
    ds = wrap_jpeg(FIXTURES / "images" / "ISIC_0000552.jpg", patient_age=80, patient_sex="M", site="back")
    assert read_metadata(ds) == {"age": 80.0, "sex": "M", "site": ("77568009", "SCT", "Back")}
    with_meta = process(ds, clf, ProcessOptions())
    del ds.PatientAge
    without_age = process(ds, clf, ProcessOptions())
    assert with_meta.metadata["age"] == 80.0
    assert with_meta.probabilities[4] > without_age.probabilities[4]
