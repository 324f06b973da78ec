"""Finding external programs the node's tools drive (DCMTK for the benchmark and the tests).

pynetdicom installs Python console scripts called ``storescu``, ``storescp``,
``echoscu`` and ``findscu`` into the virtual environment. With the venv's ``bin`` first
on PATH they shadow DCMTK's programs of the same names, whose options differ. So a DCMTK
program is looked up on PATH skipping those scripts.
"""

from __future__ import annotations

import os
from pathlib import Path


def _is_pynetdicom_script(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and b"pynetdicom" in head


def dcmtk(name: str) -> str | None:
    """Absolute path of the DCMTK program ``name`` on PATH, or None."""
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = Path(d or ".") / name
        if p.is_file() and os.access(p, os.X_OK) and not _is_pynetdicom_script(p):
            return str(p)
    return None
