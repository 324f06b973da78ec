"""Real peers for the tests: DCMTK storescp sinks, the dermnode process, fixture DICOM files.

Nothing here mocks a component: the sink is DCMTK's storescp, the node is the
``dermnode serve`` console script in its own process.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "data" / "fixtures"
STORESCU_CFG = REPO / "config" / "dcmtk" / "storescu-dermoscopy.cfg"
VENV_BIN = Path(sys.executable).parent


def require_shared() -> None:
    import pytest

    if not (FIXTURES / "labels.csv").exists():
        pytest.skip(f"shared data not found at {SHARED} (it is provided beside the repository in CI)")


def require_tool(name: str) -> str:
    import pytest

    from node.ops.external import dcmtk

    # DCMTK first, skipping pynetdicom's same-named scripts; then the venv's (dicom3tools)
    path = dcmtk(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if not path:
        pytest.skip(f"{name} is not installed (tools/setup --test installs it)")
    return path


def fixture_rows() -> list[dict]:
    with open(FIXTURES / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def small_fixtures(n: int) -> list[dict]:
    """The n smallest fixture images (fast tests), deterministic order."""
    rows = sorted(fixture_rows(), key=lambda r: (int(r["width"]) * int(r["height"]), r["isic_id"]))
    return rows[:n]


def write_fixture_dicoms(out: Path, rows: list[dict], **kw) -> list[Path]:
    """Wrap fixture JPEGs as one patient's dermoscopy session: one study, one series,
    one instance per image (the original JPEG bytes encapsulated)."""
    from node.dicomize import _uid, wrap_jpeg

    out.mkdir(parents=True, exist_ok=True)
    patient_id = kw.get("patient_id", "PID0001")
    study_uid = kw.get("study_uid", _uid("test-study", str(out), patient_id))
    series_uid = kw.get("series_uid", _uid("test-series", str(out), patient_id))
    paths = []
    first = rows[0] if rows else {}
    age = first.get("age_approx") or None  # one patient: the first row's age and sex for all
    sex = {"male": "M", "female": "F"}.get(first.get("sex", ""), None)
    for i, r in enumerate(rows):
        ds = wrap_jpeg(
            FIXTURES / r["file"],
            patient_name=kw.get("patient_name", "Testpatient^Fixture"),
            patient_id=patient_id,
            patient_sex=sex,
            patient_age=int(float(age)) if age else None,
            sop_class=kw.get("sop_class", "dermoscopic"),
            study_uid=study_uid,
            series_uid=series_uid,
        )
        ds.InstanceNumber = i + 1
        p = out / f"{r['isic_id']}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


@dataclass
class Sink:
    """DCMTK storescp writing what it receives into ``dir``."""

    dir: Path
    port: int
    aet: str = "SINK"
    #: +uf: keep every arrival in its own file (a duplicate with other content would show).
    unique: bool = False
    #: --fork: one process per association, as a PACS takes several senders at once.
    fork: bool = False
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self) -> "Sink":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir.parent / f"storescp-{self.port}.log"
        flags = (["+uf"] if self.unique else []) + (["--fork"] if self.fork else [])
        self.proc = subprocess.Popen(
            [require_tool("storescp"), "-aet", self.aet, "-od", str(self.dir), "+xa", *flags, "-dhl", str(self.port)],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
        )
        wait_port(self.port, 20, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.is_file())

    def wait_for(self, n: int, timeout: float = 120.0) -> list[Path]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            files = self.files()
            if len(files) >= n:
                time.sleep(0.3)  # let storescp finish writing the last one
                return self.files()
            time.sleep(0.2)
        raise TimeoutError(f"sink got {len(self.files())} of {n} objects in {timeout} s")


@dataclass
class NodeProcess:
    """``dermnode serve`` in its own process, configured through DERMNODE_* variables."""

    storage: Path
    dest_port: int
    dest_aet: str = "SINK"
    port: int = field(default_factory=free_port)
    ae_title: str = "DERMNODE"
    extra_env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def env(self) -> dict:
        env = dict(os.environ)
        env.update({
            "DERMNODE_NODE__PORT": str(self.port),
            "DERMNODE_NODE__BIND": "127.0.0.1",
            "DERMNODE_NODE__AE_TITLE": self.ae_title,
            "DERMNODE_DESTINATION__PORT": str(self.dest_port),
            "DERMNODE_DESTINATION__AE_TITLE": self.dest_aet,
            "DERMNODE_DESTINATION__HOST": "127.0.0.1",
            "DERMNODE_STORAGE__DIR": str(self.storage),
            "DERMNODE_STORAGE__MIN_FREE_MB": "16",
            "DERMNODE_RETRY__INITIAL_DELAY": "0.5",
            "DERMNODE_RETRY__MAX_DELAY": "2",
            "DERMNODE_MODEL__DEVICE": "cpu",
        })
        env.update({k: str(v) for k, v in self.extra_env.items()})
        return env

    def start(self, timeout: float = 120) -> "NodeProcess":
        self.storage.mkdir(parents=True, exist_ok=True)
        self.log = self.storage.parent / f"node-{self.port}.log"
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "dermnode"), "serve"],
            env=self.env(), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=REPO,
        )
        wait_port(self.port, timeout, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


def storescu(port: int, files: list[Path], aet: str = "DERMNODE", calling: str = "STORESCU", extra: list[str] | None = None,
             check: bool = True, profile: bool = True) -> subprocess.CompletedProcess:
    """DCMTK storescu with the dermoscopy profile (DCMTK 3.6.7 does not propose DMS by default)."""
    prof = ["-xf", str(STORESCU_CFG), "Dermoscopy"] if profile else []
    cmd = [require_tool("storescu"), "-aet", calling, "-aec", aet, *prof,
           *(extra or []), "127.0.0.1", str(port), *map(str, files)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"storescu failed ({res.returncode}): {res.stdout}\n{res.stderr}")
    return res
