"""The malformed-input corpus, over the network to the running node and through `dermnode process`.

Each case's required outcome is written in tests/corpus/generate.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config

from tests.corpus.generate import write
from tests.peers import VENV_BIN, NodeProcess, Sink, free_port, require_shared, require_tool

pytestmark = [pytest.mark.network, pytest.mark.slow]

ALL_SYNTAXES = [
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    require_shared()
    out = tmp_path_factory.mktemp("corpus")
    cases = write(out)
    assert len(cases) >= 30
    return out, {c.name: c for c in cases}


def _send(port: int, path: Path) -> str:
    """C-STORE the file's bytes as they are; returns '0x....', 'no-context' or 'aborted'."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes on disk, malformed or not
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="CORPUS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMNODE")
    if not assoc.is_established:
        # the node accepted the association but none of the proposed presentation contexts
        return "no-context" if assoc.rejected_contexts and not assoc.accepted_contexts else "aborted"
    try:
        if not assoc.accepted_contexts:
            return "no-context"
        try:
            rsp = assoc.send_c_store(path)
        except ValueError as exc:  # pynetdicom: no accepted context for this transfer syntax
            return "no-context" if "presentation context" in str(exc).lower() else f"error {exc}"
        status = getattr(rsp, "Status", None)
        return "aborted" if status is None else f"0x{int(status):04X}"
    finally:
        if assoc.is_established:
            assoc.release()


def test_corpus_over_the_network(corpus, tmp_path):
    out, cases = corpus
    sink = Sink(tmp_path / "sink", free_port()).start()
    node = NodeProcess(tmp_path / "node", sink.port).start()
    got = {}
    try:
        for name, case in cases.items():
            got[name] = _send(node.port, out / f"{name}.dcm")
            assert node.proc.poll() is None, f"node died on {name}"
        # the node still serves other associations
        echo = subprocess.run([require_tool("echoscu"), "-aec", "DERMNODE", "127.0.0.1", str(node.port)],
                              capture_output=True, timeout=30)
        assert echo.returncode == 0
        processed = [n for n, c in cases.items() if c.net == "processed"]
        deadline = time.time() + 600
        while time.time() < deadline:
            jobs = json.loads(subprocess.run([str(VENV_BIN / "dermnode"), "jobs", "list", "--json"], env=node.env(),
                                             capture_output=True, text=True, check=True).stdout)
            if all(j["state"] in ("done", "dead") for j in jobs) and len(jobs) >= len(processed):
                break
            time.sleep(1)
        files = sink.wait_for(4 * len(processed), timeout=120)
        time.sleep(2)
    finally:
        node.stop()
        sink.stop()
    mismatches = []
    for name, case in cases.items():
        want = {"processed": "0x0000", "ignored": "0x0000", "dead": "0x0000"}.get(case.net, case.net)
        if got[name] != want:
            mismatches.append(f"{name}: expected {case.net}, got {got[name]}")
    assert not mismatches, "\n".join(mismatches)
    by_uid = {j["sop_instance_uid"]: j for j in jobs}
    for name, case in cases.items():
        uid = str(pydicom.dcmread(out / f"{name}.dcm", force=True, stop_before_pixels=True).get("SOPInstanceUID", ""))
        job = by_uid.get(uid)
        if case.net == "processed":
            assert job and job["state"] == "done", f"{name}: {job}"
        elif case.net == "dead":
            assert job and job["state"] == "dead" and job["last_error"], f"{name}: {job}"
        elif case.net != "no-context" or name != "big-endian":
            assert job is None or case.net == "no-context", f"{name} made a job: {job}"
    # nothing half-sent: exactly 4 objects per processed input, no more
    assert len(sink.files()) == 4 * len(processed)
    log = node.log_text()
    assert "Traceback" not in log
    # no PHI in the log of a full run with odd character sets
    for phi in ("Corpus^Case", "Corpus", "CORPUS01", "Müller", "Zoë", "Yamada", "山田"):
        assert phi not in log, phi


def test_corpus_offline(corpus, tmp_path):
    out, cases = corpus
    res = subprocess.run([str(VENV_BIN / "dermnode"), "process", str(out), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    ok = {Path(p["input"]).stem for p in summary["processed"]}
    failed = {Path(p["input"]).stem: p["reason"] for p in summary["failed"]}
    assert res.returncode == (1 if failed else 0)
    mismatches = []
    for name, case in cases.items():
        if case.offline == "ok" and name not in ok:
            mismatches.append(f"{name}: expected ok, failed: {failed.get(name)}")
        if case.offline == "fail" and name not in failed:
            mismatches.append(f"{name}: expected a failure, was processed")
        if name in failed:
            assert failed[name] and "Traceback" not in failed[name]
            assert f"FAILED {out / (name + '.dcm')}" in res.stderr
    assert not mismatches, "\n".join(mismatches)
    # every processed input has its 4 objects
    for p in summary["processed"]:
        assert sorted(x.name for x in Path(p["output"]).glob("*.dcm")) == ["image.dcm", "pmap.dcm", "seg.dcm", "sr.dcm"]
