"""Re-evaluate the shipped weights on the fixed held-out split; the card's figures must hold.

Also checks the split is fixed and the metric formulas (rank AUC, balanced accuracy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from node.model.card import read_card
from node.model.classifier import Classifier
from node.model.split import balanced_accuracy, is_held_out, per_class_recall, roc_auc, summarise

from ._model_helpers import DATA, FIXTURES_DIR, NO_SHARED, PACKAGE, TRAIN_DIR, train_module, train_rows

TOLERANCE = 0.02


# ---------------------------------------------------------------- formulas and split (no data)


def _pairwise_auc(s, y):
    pos, neg = s[y], s[~y]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])


@pytest.mark.parametrize("seed", range(5))
def test_rank_auc_equals_pairwise(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, 40).astype(float)  # many ties
    y = rng.random(40) < 0.3
    assert roc_auc(s, y) == pytest.approx(_pairwise_auc(s, y), abs=1e-12)


def test_auc_edges():
    assert roc_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert roc_auc(np.array([0.9, 0.1]), np.array([False, True])) == 0.0
    assert np.isnan(roc_auc(np.array([0.1, 0.9]), np.array([True, True])))


def test_balanced_accuracy():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 0, 1, 1, 0, 2])
    np.testing.assert_allclose(per_class_recall(y, p, 4)[:3], [0.75, 0.5, 1.0])
    assert np.isnan(per_class_recall(y, p, 4)[3])
    assert balanced_accuracy(y, p, 4) == pytest.approx(0.75)


def test_split_is_fixed():
    # pinned: changing the split function would silently invalidate the card's figures
    assert [i for i in range(40) if is_held_out(f"ISIC_{i:07d}")] == [0, 11, 22, 31, 34, 35, 37]
    assert sum(is_held_out(f"ISIC_{i:07d}") for i in range(5000)) == pytest.approx(1000, abs=100)


# ---------------------------------------------------------------- the shipped weights


@pytest.fixture(scope="module")
def card():
    c = read_card(PACKAGE)
    if c.model.untrained:
        pytest.skip("the shipped model card says untrained = true: no figures to hold it to")
    return c


@pytest.fixture(scope="module")
def clf(card):
    return Classifier.load(PACKAGE, device="cpu")


def _probs(clf, images, bs=48):
    return np.concatenate([clf.forward_only(images[i : i + bs]) for i in range(0, len(images), bs)])


@pytest.mark.skipif(not DATA.is_dir(), reason=NO_SHARED)
def test_held_out_figures_hold(card, clf):
    tm = train_module()
    rows = [r for r in train_rows() if is_held_out(r["isic_id"])]
    assert len(rows) == card.evaluation.n
    images = np.stack([tm.read_train_input(TRAIN_DIR / r["file"]) for r in rows])
    y = np.array([card.class_codes.index(r["dx"]) for r in rows])
    got = summarise(_probs(clf, images), y, card.class_codes)
    msg = f"re-evaluated {got} vs card {card.evaluation}"
    assert got["balanced_accuracy"] >= card.evaluation.balanced_accuracy - TOLERANCE, msg
    assert got["melanoma_auc"] >= card.evaluation.melanoma_auc - TOLERANCE, msg
    # and the card does not understate them either (it was written from these weights)
    assert got["balanced_accuracy"] == pytest.approx(card.evaluation.balanced_accuracy, abs=TOLERANCE), msg
    assert got["melanoma_auc"] == pytest.approx(card.evaluation.melanoma_auc, abs=TOLERANCE), msg


@pytest.mark.skipif(not (FIXTURES_DIR / "labels.csv").is_file(), reason=NO_SHARED)
def test_full_frame_figures_hold(card, clf):
    ff = card.evaluation.full_frame
    if "melanoma_auc" not in ff:
        pytest.skip("card has no full-frame evaluation")
    tm = train_module()
    rows = tm.read_rows(FIXTURES_DIR / "labels.csv")
    images = np.stack([tm.read_full_frame_center_crop(FIXTURES_DIR / r["file"]) for r in rows])
    y = np.array([card.class_codes.index(r["dx"]) for r in rows])
    got = summarise(_probs(clf, images), y, card.class_codes)
    assert got["n"] == ff["n"]
    assert got["melanoma_auc"] >= float(ff["melanoma_auc"]) - TOLERANCE, (got, ff)
