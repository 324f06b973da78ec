"""Loopback end to end with real peers: DCMTK storescu -> dermnode serve -> DCMTK storescp."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest

from tests.peers import NodeProcess, Sink, free_port, require_shared, require_tool, small_fixtures, storescu, write_fixture_dicoms

pytestmark = pytest.mark.network

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
PM = "1.2.840.10008.5.1.4.1.1.30"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    require_shared()
    require_tool("storescu")
    base = tmp_path_factory.mktemp("net")
    sink = Sink(base / "sink", free_port()).start()
    node = NodeProcess(base / "node", sink.port).start()
    inputs = write_fixture_dicoms(base / "in", small_fixtures(3))
    yield base, sink, node, inputs
    node.stop()
    sink.stop()


def _by_class(files):
    out = {}
    for f in files:
        ds = pydicom.dcmread(f)
        out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def test_echo(loop):
    _, _, node, _ = loop
    res = subprocess.run([require_tool("echoscu"), "-aec", "DERMNODE", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_storescu_to_node_to_storescp(loop):
    base, sink, node, inputs = loop
    res = storescu(node.port, inputs)
    assert "Status" not in res.stderr or "Success" in res.stderr or res.returncode == 0
    files = sink.wait_for(4 * len(inputs), timeout=180)
    assert len(files) == 4 * len(inputs), [f.name for f in files]
    got = _by_class(files)
    assert sorted(got) == sorted([DMS, SEG, PM, SR])
    sources = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in inputs}
    for cls, items in got.items():
        assert len(items) == len(inputs), cls
        for ds in items:
            assert ds.StudyInstanceUID in {s.StudyInstanceUID for s in sources.values()}
            assert "DERMNODE" not in str(ds.PatientName)
    # Each resized image references its source and is the model input size.
    for img in got[DMS]:
        assert list(img.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        src_uid = img.SourceImageSequence[0].ReferencedSOPInstanceUID
        src = sources[src_uid]
        assert img.PatientID == src.PatientID and img.StudyInstanceUID == src.StudyInstanceUID
        assert (img.Rows, img.Columns) == (224, 224)
        assert img.SeriesInstanceUID != src.SeriesInstanceUID
    # One series per output type.
    series = {cls: {ds.SeriesInstanceUID for ds in items} for cls, items in got.items()}
    assert len(set().union(*series.values())) == 4
    # SR: probabilities are a distribution and name the model.
    for sr in got[SR]:
        probs = [
            float(item.MeasuredValueSequence[0].NumericValue)
            for item in _walk(sr)
            if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "122157"
        ]
        assert len(probs) == 7 and abs(sum(probs) - 1.0) < 1e-3
        assert "not for diagnostic use" in str(sr.SeriesDescription).lower()
    # Journal: every job done, and no crash in the node's log.
    jobs = subprocess.run([str(_dermnode()), "jobs", "list", "--state", "done", "--json"], env=node.env(),
                          capture_output=True, text=True, timeout=60)
    assert jobs.returncode == 0, jobs.stderr
    import json

    assert len(json.loads(jobs.stdout)) == len(inputs)
    assert "Traceback" not in node.log_text()


def test_patient_names_not_logged_at_info(loop):
    _, _, node, _ = loop
    text = node.log_text()
    assert "job" in text  # the log is there and has job lines
    assert "Testpatient" not in text and "Fixture" not in text and "PID0001" not in text


def test_own_outputs_routed_back_are_ignored(loop):
    base, sink, node, inputs = loop
    before = sink.files()
    assert before, "needs the main test to have run"
    res = storescu(node.port, before)  # the node's own 4 x N outputs
    assert res.returncode == 0
    import time

    time.sleep(3)
    assert sink.files() == before  # nothing new produced


def _dermnode():
    from tests.peers import VENV_BIN

    return VENV_BIN / "dermnode"


def _walk(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)


def test_metrics_and_health_after_a_real_run(tmp_path):
    """The HTTP endpoint's counters after real C-STOREs; readiness follows the destination."""
    import json
    import urllib.error
    import urllib.request

    require_shared()
    sink = Sink(tmp_path / "sink", free_port()).start()
    http_port = free_port()
    node = NodeProcess(tmp_path / "node", sink.port,
                       extra_env={"DERMNODE_HTTP__PORT": http_port, "DERMNODE_LOGGING__FORMAT": "json"}).start()
    try:
        inputs = write_fixture_dicoms(tmp_path / "in", small_fixtures(2))
        storescu(node.port, inputs)
        sink.wait_for(8)

        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=30) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        import time

        deadline = time.time() + 30
        while time.time() < deadline:  # the journal marks 'done' right after the last ack
            code, metrics = get("/metrics")
            if 'dermnode_jobs{state="done"} 2.0' in metrics:
                break
            time.sleep(0.5)
        assert code == 200
        assert 'dermnode_images_received_total{outcome="accepted"} 2.0' in metrics
        assert 'dermnode_jobs{state="done"} 2.0' in metrics
        assert 'dermnode_objects_sent_total{kind="sr"} 2.0' in metrics
        assert 'dermnode_stage_seconds_count{stage="infer"} 2.0' in metrics
        assert 'dermnode_associations_total{outcome="released"}' in metrics
        assert "dermnode_queue_depth 0.0" in metrics
        code, body = get("/healthz")
        assert code == 200 and json.loads(body)["ok"] is True
        code, body = get("/readyz")
        assert code == 200 and json.loads(body)["destination_reachable"] is True
        sink.stop()
        time.sleep(11)  # readiness is cached for 10 s
        code, body = get("/readyz")
        assert code == 503 and json.loads(body)["destination_reachable"] is False
        assert get("/nope")[0] == 404
    finally:
        node.stop()
        sink.stop()
    # JSON logs: every line is an object; one job id through every line of a job
    records = [json.loads(line) for line in node.log_text().splitlines() if line.strip()]
    by_job = {}
    for r in records:
        if "job_id" in r:
            by_job.setdefault(r["job_id"], []).append(r["msg"])
    assert len(by_job) == 2
    for msgs in by_job.values():
        assert any("received" in m for m in msgs) and any("encoded" in m for m in msgs) and any("done" in m for m in msgs)
