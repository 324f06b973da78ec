"""Smoke test of ``dermnode bench --size tiny``: it runs end to end and writes the JSON it promises.

Nothing is timed here: the figures depend on the machine; only their presence and
shape are checked.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.peers import REPO, VENV_BIN, require_shared, require_tool

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and x >= 0


#: The default settings, and the pooled runtime (decode/encode in a worker process).
RUNTIMES = {
    "default": {},
    "pool": {"DERMNODE_PROCESSING__WORKERS": "2", "DERMNODE_PROCESSING__POOL_WORKERS": "1"},
}


@pytest.mark.parametrize("runtime", list(RUNTIMES))
def test_bench_tiny_writes_the_expected_json(tmp_path, runtime):
    require_shared()
    require_tool("storescp")
    require_tool("storescu")
    out = tmp_path / "out.json"
    res = subprocess.run(
        [str(VENV_BIN / "dermnode"), "bench", "--size", "tiny", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, **RUNTIMES[runtime]},
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "compute ceiling" in res.stdout and "end to end" in res.stdout

    r = json.loads(out.read_text())
    assert r["size"] == "tiny" and r["repeat"] == 1
    assert r["config"]["pool_workers"] == int(RUNTIMES[runtime].get("DERMNODE_PROCESSING__POOL_WORKERS", 0))
    assert {"compute", "model", "ingest", "e2e", "encode_to_inference", "memory", "checks", "targets", "config"} <= r.keys()

    stages = r["compute"]["stages_ms"]
    for key in ("read", "decode", "frame", "segment", "classify_cam", "build", "serialise", "encode", "total"):
        assert _number(stages[key]), key
    assert _number(r["compute"]["images_per_s"]) and r["compute"]["images_per_s"] > 0
    for key in ("forward_ms", "classify_cam_ms", "ratio"):
        assert _number(r["model"][key]), key
    assert _number(r["ingest"]["images_per_s"])
    for profile in ("light", "burst"):
        e = r["e2e"][profile]
        assert e["images"] > 0 and _number(e["images_per_s"])
        assert set(e["latency_s"]) == {"p50", "p95", "p99"}
        assert all(_number(v) for v in e["latency_s"].values())
        assert e["latency_s"]["p50"] <= e["latency_s"]["p95"] <= e["latency_s"]["p99"]
    assert r["e2e"]["light"]["rate_per_s"] == 1.0
    assert _number(r["e2e"]["to_compute_ratio"]) and "to_compute_ratio_steady" in r["e2e"]
    assert _number(r["encode_to_inference"]["ratio"])
    assert r["memory"]["node_and_workers_peak_rss_mb"] >= r["memory"]["node_peak_rss_mb"] > 0
    assert set(r["checks"]) == {"model_ratio", "e2e_to_compute", "encode_to_inference", "light_latency", "memory"}
    assert all(isinstance(v, bool) for v in r["checks"].values())


def test_bench_rejects_an_unknown_size():
    res = subprocess.run([str(VENV_BIN / "dermnode"), "bench", "--size", "huge"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode == 2 and "--size" in res.stderr
