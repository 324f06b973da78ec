"""The README's first command: `bash tools/run serve` (here `--help` and `echo --self` against a
node it starts), through the same setup script, in this checkout."""

from __future__ import annotations

import os
import signal
import subprocess

from tests.peers import REPO, free_port, wait_port


def test_tools_run_reaches_the_cli():
    res = subprocess.run(["bash", "tools/run", "--help"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    for command in ("serve", "process", "echo", "jobs", "model", "bench", "demo", "worker"):
        assert command in res.stdout


def test_tools_run_serve_on_embedded_defaults(tmp_path):
    port = free_port()
    env = dict(os.environ, DERMNODE_NODE__PORT=str(port), DERMNODE_STORAGE__DIR=str(tmp_path / "var"),
               DERMNODE_STORAGE__MIN_FREE_MB="16")
    proc = subprocess.Popen(["bash", "tools/run", "serve"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, 300, proc)
        echo = subprocess.run(["bash", "tools/run", "echo", "--self"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert echo.returncode == 0 and "status 0x0000" in echo.stdout, echo.stdout + echo.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert "listening on" in out and "destination ORTHANC@127.0.0.1:4242" in out
