"""Never lose an image: the real node process killed mid-burst, the PACS down, permanent
rejection, disk watermark. The sink is DCMTK storescp with unique file names, so every
arrival is kept and duplicates with different content would be visible."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, evt

from tests.peers import (
    VENV_BIN,
    NodeProcess,
    Sink,
    free_port,
    require_shared,
    require_tool,
    small_fixtures,
    storescu,
    write_fixture_dicoms,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"


def _variants(base: Path, n: int, out: Path) -> list[Path]:
    """n distinct instances (own SOP Instance UIDs) of one small fixture image."""
    ds = pydicom.dcmread(base)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        p = out / f"img{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _content_hash(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path)
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    pydicom.filewriter.write_dataset(buf, ds)
    return str(ds.SOPInstanceUID), hashlib.sha256(buf.getvalue()).hexdigest()


def _send(port: int, paths: list[Path], acked: set, lock: threading.Lock) -> None:
    """One association per thread; stops quietly when the node dies."""
    ae = AE(ae_title="BURST")
    ae.add_requested_context(DMS, "1.2.840.10008.1.2.4.50")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMNODE")
    if not assoc.is_established:
        return
    try:
        for p in paths:
            rsp = assoc.send_c_store(p)
            if getattr(rsp, "Status", None) == 0x0000:
                with lock:
                    acked.add(p)
            elif not assoc.is_established:
                return
    finally:
        if assoc.is_established:
            assoc.release()


def _dermnode(node: NodeProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "dermnode"), *args], env=node.env(), capture_output=True, text=True, timeout=120)


def _wait_done(node: NodeProcess, n: int, timeout: float) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        res = _dermnode(node, "jobs", "list", "--json")
        jobs = json.loads(res.stdout) if res.returncode == 0 else []
        if sum(j["state"] == "done" for j in jobs) >= n:
            return jobs
        dead = [j for j in jobs if j["state"] == "dead"]
        assert not dead, f"dead-lettered: {dead}"
        time.sleep(1)
    raise AssertionError(f"only {sum(j['state'] == 'done' for j in jobs)} of {n} jobs done: "
                         f"{ {j['state'] for j in jobs} }\n{node.log_text()[-3000:]}")


@pytest.fixture
def inputs(tmp_path):
    require_shared()
    [first] = write_fixture_dicoms(tmp_path / "src", small_fixtures(1))
    return first


def test_sigkill_mid_burst_loses_nothing(tmp_path, inputs):
    n_images, n_threads = 200, 4
    paths = _variants(inputs, n_images, tmp_path / "burst")
    sink = Sink(tmp_path / "sink", free_port(), unique=True).start()  # every arrival kept
    node = NodeProcess(tmp_path / "node", sink.port).start()
    acked: set[Path] = set()
    lock = threading.Lock()
    rng = random.Random(20261122)
    kills = 0
    try:
        pending = list(paths)
        while pending:
            chunks = [pending[i::n_threads] for i in range(n_threads)]
            threads = [threading.Thread(target=_send, args=(node.port, c, acked, lock)) for c in chunks]
            for t in threads:
                t.start()
            if kills < 3:
                # kill at a random moment: during intake, processing or sending
                target = len(acked) + rng.randint(10, 40)
                deadline = time.time() + 120
                while len(acked) < target and any(t.is_alive() for t in threads) and time.time() < deadline:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0, 0.5))
                node.stop(signal.SIGKILL)
                kills += 1
            for t in threads:
                t.join(300)
            if node.proc.poll() is not None:
                node.start()
            with lock:
                pending = [p for p in paths if p not in acked]  # the PACS re-sends what was not acknowledged
        assert kills == 3
        _wait_done(node, n_images, timeout=900)
        files = sink.wait_for(4 * n_images, timeout=120)
    finally:
        node.stop()
        sink.stop()
    seen: dict[str, set[str]] = {}
    for f in files:
        uid, digest = _content_hash(f)
        seen.setdefault(uid, set()).add(digest)
    assert len(seen) == 4 * n_images, f"{len(seen)} distinct objects for {n_images} images"
    changed = {uid: d for uid, d in seen.items() if len(d) > 1}
    assert not changed, f"same SOP Instance UID with different content: {list(changed)[:3]}"
    # Every acknowledged image has its resized image (which references it) at the sink.
    sources = {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}
    referenced = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.SOPClassUID == DMS:
            referenced.add(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID))
    assert referenced == sources


def test_pacs_down_then_back_including_a_node_restart(tmp_path, inputs):
    sink_port = free_port()
    node = NodeProcess(tmp_path / "node", sink_port).start()
    paths = _variants(inputs, 4, tmp_path / "imgs")
    sink = Sink(tmp_path / "sink", sink_port)
    try:
        storescu(node.port, paths[:2])
        # PACS down: jobs wait in 'encoded' with a persisted retry schedule
        deadline = time.time() + 120
        while time.time() < deadline:
            jobs = json.loads(_dermnode(node, "jobs", "list", "--json").stdout)
            if len(jobs) == 2 and all(j["state"] == "encoded" and j["send_attempts"] >= 1 for j in jobs):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"jobs not waiting for retry: {jobs}")
        assert "connection" in jobs[0]["last_error"].lower() or "association" in jobs[0]["last_error"].lower()
        # restart the node while the PACS is still down, and send two more
        node.stop()
        node.start()
        storescu(node.port, paths[2:])
        time.sleep(2)
        sink.start()  # PACS back: everything is delivered with no operator action
        files = sink.wait_for(16, timeout=120)
        _wait_done(node, 4, timeout=60)
    finally:
        node.stop()
        sink.stop()
    assert len({_content_hash(f)[0] for f in files}) == 16


def test_permanent_rejection_goes_to_dead_letter_then_retry_after_fix(tmp_path, inputs):
    received = []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    scp = AE(ae_title="RIGHTAE")
    scp.require_called_aet = True
    for uid in (DMS, "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.88.34"):
        scp.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    node = NodeProcess(tmp_path / "node", port, dest_aet="WRONGAE").start()
    try:
        [p] = _variants(inputs, 1, tmp_path / "imgs")
        storescu(node.port, [p])
        deadline = time.time() + 60
        while time.time() < deadline:
            jobs = json.loads(_dermnode(node, "jobs", "list", "--state", "dead", "--json").stdout)
            if jobs:
                break
            time.sleep(0.5)
        assert jobs and "rejected" in jobs[0]["last_error"] and "permanent" in jobs[0]["last_error"]
        assert jobs[0]["send_attempts"] == 0  # not retried
        node.stop()
        node.dest_aet = "RIGHTAE"  # the operator fixes the config...
        node.start()
        res = _dermnode(node, "jobs", "retry", "--all-dead")  # ...and requeues
        assert res.returncode == 0 and "requeued 1" in res.stdout
        _wait_done(node, 1, timeout=60)
        assert len(received) == 4
        show = _dermnode(node, "jobs", "show", jobs[0]["id"])
        assert "requeued" in show.stdout and "rejected" in show.stdout
        detail = json.loads(_dermnode(node, "jobs", "show", jobs[0]["id"], "--json").stdout)
        assert [(o["kind"], o["state"], o["status"]) for o in detail["outputs"]] == [
            (k, "sent", 0) for k in ("image", "seg", "pmap", "sr")]
    finally:
        node.stop()
        server.shutdown()


def test_disk_watermark_refuses_with_a700_and_keeps_nothing(tmp_path, inputs):
    sink = Sink(tmp_path / "sink", free_port()).start()
    node = NodeProcess(tmp_path / "node", sink.port, extra_env={"DERMNODE_STORAGE__MIN_FREE_MB": str(2**40)}).start()
    try:
        res = storescu(node.port, [inputs], check=False, extra=["-v"])
        assert "Refused: OutOfResources" in res.stdout + res.stderr
        assert list((tmp_path / "node" / "spool" / "in").iterdir()) == []
        assert list((tmp_path / "node" / "spool" / "tmp").iterdir()) == []
        assert "watermark" in node.log_text()
    finally:
        node.stop()
        sink.stop()
