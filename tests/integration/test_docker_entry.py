"""Docker is not available here, so test what the image would run: the Dockerfile's ENV,
ENTRYPOINT + CMD and HEALTHCHECK, from a fresh virtual environment with a non-editable
install of the project (as `pip install .` in the Dockerfile), with the model and config
copied into an /opt/dermnode-like tree."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers import REPO, free_port, wait_port

pytestmark = pytest.mark.slow


def _dockerfile():
    text = (REPO / "Dockerfile").read_text()
    env = {}
    for m in re.finditer(r"^ENV\s+((?:.+\\\n)*.+)$", text, re.M):
        for tok in shlex.split(m.group(1).replace("\\\n", " ")):
            k, _, v = tok.partition("=")
            env[k] = v
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])$", text, re.M).group(1))
    health = json.loads(re.search(r"^HEALTHCHECK .*CMD\s+(\[.*\])$", text, re.M).group(1))
    workdir = re.search(r"^WORKDIR\s+(\S+)$", text, re.M).group(1)
    volume = json.loads(re.search(r"^VOLUME\s+(\[.*\])$", text, re.M).group(1))[0]
    assert re.search(r"^USER\s+(?!root)\S+$", text, re.M), "the image must not run as root"
    return env, entry, cmd, health, workdir, volume


def test_entry_command_from_a_fresh_venv(tmp_path):
    env, entry, cmd, health, workdir, volume = _dockerfile()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # dependencies from the project's environment; the project itself installed fresh, non-editable
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(str(deps) + "\n")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "var", "build", "*.egg-info", "__pycache__"))
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(src)],
                   check=True, timeout=300)
    # the image's tree: /opt/dermnode holds models/ and config/ (COPY), the volume holds data
    opt = tmp_path / "opt-dermnode"
    shutil.copytree(src / "models", opt / "models")
    shutil.copytree(src / "config", opt / "config")
    data = tmp_path / "volume"
    data.mkdir()

    def translate(v: str) -> str:
        return v.replace(volume, str(data)).replace(workdir, str(opt))

    run_env = {k: translate(v) for k, v in env.items()}
    port = free_port()
    run_env.update({"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "DERMNODE_NODE__PORT": str(port),
                    "DERMNODE_STORAGE__MIN_FREE_MB": "16", "HOME": str(tmp_path)})
    argv = [translate(a) for a in entry + cmd]
    assert argv[0] == "dermnode"
    proc = subprocess.Popen([str(venv / "bin" / argv[0]), *argv[1:]], env=run_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        try:
            wait_port(port, 120, proc)
        except RuntimeError:
            raise AssertionError(proc.stdout.read()) from None
        hc = subprocess.run([str(venv / "bin" / health[0]), *health[1:]], env=run_env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
        assert hc.returncode == 0, hc.stdout + hc.stderr
        assert "status 0x0000" in hc.stdout
        assert (data / "journal.sqlite").exists()  # state goes to the volume
        proc.send_signal(signal.SIGTERM)  # docker stop
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopped" in out
    # the installed package is the fresh one, not the repository's editable checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import node; print(node.__file__)"],
                           capture_output=True, text=True, env=run_env, cwd=tmp_path).stdout
    assert str(venv) in where
