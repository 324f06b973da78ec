"""``dermnode demo``: a local Orthanc, the node, and the CC0 fixtures, for a newcomer.

Also used by the Orthanc end-to-end test, so the demo and the test exercise the
same Orthanc configuration and the same shipped Lua routing script.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from node.config import PACKAGE_ROOT

ROUTE_SCRIPT = PACKAGE_ROOT / "config" / "orthanc" / "route-dermoscopy.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc")


@dataclass
class Orthanc:
    """A throwaway Orthanc on loopback ports, with dermnode declared as a modality."""

    workdir: Path
    node_aet: str = "DERMNODE"
    node_port: int = 11112
    lua_scripts: list[Path] = field(default_factory=lambda: [ROUTE_SCRIPT])
    aet: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict:
        return {
            "Name": "dermnode-demo",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            # Orthanc 1.10 (DCMTK 3.6.7) does not know Dermoscopic Photography; accept it anyway.
            "UnknownSopClassAccepted": True,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"dermnode": [self.node_aet, "127.0.0.1", self.node_port]},
            "LuaScripts": [str(p) for p in self.lua_scripts],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "StableAge": 2,
        }

    def start(self, timeout: float = 60) -> "Orthanc":
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (Debian: apt-get install orthanc)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        self.log = self.workdir / "orthanc.log"
        self.proc = subprocess.Popen([binary, str(cfg)], stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.log}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())


def push(files: list[Path], host: str, port: int, called: str, calling: str = "DEMO") -> int:
    """C-STORE files with pynetdicom; returns how many were acknowledged with success."""
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    classes = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        classes.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    for cls, syntaxes in classes.items():
        ae.add_requested_context(cls, sorted(syntaxes))
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        raise ConnectionError(f"cannot associate with {called}@{host}:{port}")
    ok = 0
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            ok += int(getattr(rsp, "Status", -1) == 0)
    finally:
        assoc.release()
    return ok


def run_demo(workdir: Path, n_images: int = 4, node_port: int | None = None, wait: bool = True, echo=print) -> dict:
    """Start Orthanc and the node, push fixture images, wait for the results; returns a summary."""
    import csv

    from node.config import load_settings
    from node.dicomize import wrap_jpeg
    from node.ops.logs import setup_logging
    from node.service import Node

    fixtures = PACKAGE_ROOT.parent / "shared" / "data" / "fixtures"
    if not (fixtures / "labels.csv").exists():
        raise FileNotFoundError(f"fixture images not found at {fixtures}")
    node_port = node_port or free_port()
    orthanc = Orthanc(workdir / "orthanc", node_port=node_port).start()
    echo(f"Orthanc started: DICOM {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}, web {orthanc.url}")
    settings = load_settings(env={
        "DERMNODE_NODE__PORT": str(node_port),
        "DERMNODE_NODE__BIND": "127.0.0.1",
        "DERMNODE_DESTINATION__PORT": str(orthanc.dicom_port),
        "DERMNODE_DESTINATION__AE_TITLE": orthanc.aet,
        "DERMNODE_STORAGE__DIR": str(workdir / "node"),
        "DERMNODE_STORAGE__MIN_FREE_MB": "64",
    })
    setup_logging("INFO")
    node = Node(settings)
    node.start()
    try:
        with open(fixtures / "labels.csv", newline="") as fh:
            rows = sorted(csv.DictReader(fh), key=lambda r: int(r["width"]) * int(r["height"]))[:n_images]
        files = []
        from node.dicomize import _uid

        study = _uid("demo-study")
        series = _uid("demo-series")
        for i, r in enumerate(rows):
            ds = wrap_jpeg(fixtures / r["file"], patient_name="Demo^Patient", patient_id="DEMO001",
                           study_uid=study, series_uid=series)
            ds.InstanceNumber = i + 1
            p = workdir / "inputs" / f"{r['isic_id']}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(p, enforce_file_format=True)
            files.append(p)
        sent = push(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet)
        echo(f"pushed {sent} dermoscopy images to Orthanc; it routes them to dermnode")
        expected = 5 * len(files)
        deadline = time.time() + 300
        instances = []
        while time.time() < deadline:
            instances = orthanc.get("/instances")
            if len(instances) >= expected:
                break
            time.sleep(1)
        studies = orthanc.get("/studies")
        url = f"{orthanc.url}/app/explorer.html#study?uuid={studies[0]}" if studies else orthanc.url
        echo(f"{len(instances)} instances in Orthanc ({len(files)} originals + {len(instances) - len(files)} results)")
        echo(f"Open the study in Orthanc Explorer: {url}")
        summary = {"orthanc": orthanc.url, "study_url": url, "instances": len(instances), "images": len(files)}
        if wait:
            echo("Press Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return summary
    finally:
        node.stop()
        orthanc.stop()
