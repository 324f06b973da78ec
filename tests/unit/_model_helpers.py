"""Shared helpers for the model-package, Grad-CAM and model-metrics tests."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
TRAIN_DIR = DATA / "train"
FIXTURES_DIR = DATA / "fixtures"
PACKAGE = REPO / "models" / "derm-effnetlite0-ham7"

NO_SHARED = f"shared data not found at {DATA} (expected <repo>/../shared/data)"


@lru_cache(maxsize=1)
def train_module():
    """``models/train.py`` imported as a module (it is a script, not a package)."""
    path = REPO / "models" / "train.py"
    spec = importlib.util.spec_from_file_location("dermnode_models_train", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def train_rows() -> list[dict]:
    with open(TRAIN_DIR / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def some_train_images(n: int = 4, size: int = 224) -> np.ndarray:
    """``n`` real training crops as model input (N x size x size x 3 uint8), one per class first."""
    rows, seen = [], set()
    for r in train_rows():
        if r["dx"] not in seen:
            rows.append(r)
            seen.add(r["dx"])
        if len(rows) == n:
            break
    tm = train_module()
    return np.stack([tm.read_train_input(TRAIN_DIR / r["file"], size) for r in rows])


def copy_package(dst: Path, weights: bool = True) -> Path:
    """Copy the shipped package into ``dst`` (a fresh directory) and return it."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(PACKAGE / "card.toml", dst / "card.toml")
    if weights:
        shutil.copy(PACKAGE / "weights.safetensors", dst / "weights.safetensors")
    return dst
