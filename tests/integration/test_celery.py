"""Scale-out on Celery with a Redis broker, with real processes only: redis-server, the
``dermnode serve`` front end (executor.kind = celery), ``dermnode worker`` processes and a
DCMTK storescp sink that keeps every arrival (+uf). A worker is SIGKILLed mid-task (its
task must be delivered again: acks_late), then the front end is SIGKILLed and restarted
(it must pick up the journaled tasks' outcomes), then another worker gets SIGTERM (warm
shutdown: it finishes the task in hand). Every image's 4 outputs must arrive, a
duplicate arrival only ever being the same instance with the same content."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from node.executor.celery_app import BrokerOptions
from tests.integration.test_durability import _content_hash, _dermnode, _variants
from tests.peers import (
    REPO,
    VENV_BIN,
    NodeProcess,
    Sink,
    free_port,
    require_shared,
    require_tool,
    small_fixtures,
    storescu,
    wait_port,
    write_fixture_dicoms,
)

DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"
#: Short, so that the killed worker's task comes back within the test (production: 600 s).
VISIBILITY_TIMEOUT = 12


def test_broker_url_options_are_ours_and_stripped():
    b = BrokerOptions("redis://h:6379/0?visibility_timeout=30&health_check_interval=5")
    assert b.url == "redis://h:6379/0?health_check_interval=5"
    assert b.visibility_timeout == 30 and b.max_countdown == 15 and b.lost_after == 120
    assert b.transport_options()["visibility_timeout"] == 30
    plain = BrokerOptions("amqp://guest@rabbit//")
    assert plain.url == "amqp://guest@rabbit//" and plain.transport_options() == {}
    with pytest.raises(ValueError, match="visibility_timeout"):
        BrokerOptions("redis://h/0?visibility_timeout=soon")


class Redis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Redis":
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=open(self.workdir / "redis.log", "wb"), stderr=subprocess.STDOUT,
        )
        wait_port(self.port, 20, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Worker:
    """``dermnode worker`` in its own process group (so SIGKILL takes its pool process too)."""

    def __init__(self, name: str, env: dict, logdir: Path) -> None:
        self.name = name
        self.env = env
        self.log = logdir / f"worker-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Worker":
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "dermnode"), "worker", "--concurrency", "1", "--threads", "1", "--name", f"{self.name}@test"],
            env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(r"@test ready\.", self.text()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"worker {self.name} not ready after {timeout} s:\n{self.text()[-3000:]}")

    def tasks(self) -> tuple[list[str], list[str]]:
        """Task ids this worker received, and those it finished."""
        text = self.text()
        received = re.findall(r"Task dermnode\.process\[([0-9a-f]+)\] received", text)
        finished = re.findall(r"Task dermnode\.process\[([0-9a-f]+)\] succeeded", text)
        return received, finished

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # Celery warm shutdown
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode if self.proc else None


def _jobs(node: NodeProcess) -> list[dict]:
    res = _dermnode(node, "jobs", "list", "--json")
    return json.loads(res.stdout) if res.returncode == 0 and res.stdout.strip() else []


@pytest.mark.network
@pytest.mark.slow
def test_two_workers_one_killed_every_output_arrives_once_in_content(tmp_path):
    require_shared()
    require_tool("storescp")
    require_tool("storescu")
    redis = Redis(tmp_path / "redis").start()
    n_images = 100
    [base] = write_fixture_dicoms(tmp_path / "src", small_fixtures(1))
    paths = _variants(base, n_images, tmp_path / "imgs")
    # every arrival kept (+uf); one association per worker at once (--fork), as a PACS does:
    # without --fork, one worker's association blocks the others'
    sink = Sink(tmp_path / "sink", free_port(), unique=True, fork=True).start()
    celery_env = {
        "DERMNODE_EXECUTOR__KIND": "celery",
        "DERMNODE_EXECUTOR__BROKER_URL": f"redis://127.0.0.1:{redis.port}/0?visibility_timeout={VISIBILITY_TIMEOUT}",
        "DERMNODE_EXECUTOR__RESULT_BACKEND": f"redis://127.0.0.1:{redis.port}/1",
        "DERMNODE_EXECUTOR__QUEUE": "cpu",
    }
    node = NodeProcess(tmp_path / "node", sink.port, extra_env=celery_env)
    workers: list[Worker] = []
    t_start = time.time()
    try:
        node.start()
        env = node.env()
        w1, w2 = Worker("w1", env, tmp_path).start(), Worker("w2", env, tmp_path).start()
        workers += [w1, w2]
        w1.wait_ready()
        w2.wait_ready()
        assert "Celery executor: queue cpu" in node.log_text(), node.log_text()[-2000:]

        storescu(node.port, paths)  # all acknowledged only once spooled and journaled

        # SIGKILL w1 while it holds a task (received, not finished), after it did some work
        deadline = time.time() + 150
        while time.time() < deadline:
            received, finished = w1.tasks()
            if len(finished) >= 8 and len(received) > len(finished):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"w1 never busy with some work done: {w1.tasks()}\n{w1.text()[-2000:]}")
        w1.kill()
        received, finished = w1.tasks()
        in_hand = set(received) - set(finished)
        assert in_hand, "the kill should have caught w1 mid-task"
        w3 = Worker("w3", env, tmp_path).start()  # the replacement
        workers.append(w3)
        # the front end crashes too, with tasks in flight: their ids are journaled, so the
        # restarted front end picks up their outcomes (and dispatches whatever was not yet)
        node.stop(signal.SIGKILL)
        node.start()
        # SIGTERM is a warm shutdown: w2 finishes (and acknowledges) the task in hand, then exits
        deadline = time.time() + 120
        while time.time() < deadline:
            received2, finished2 = w2.tasks()
            if len(finished2) >= 5 and len(received2) > len(finished2):
                break
            time.sleep(0.05)
        w2_in_hand = set(received2) - set(finished2)
        assert w2.stop() == 0, f"w2 did not stop cleanly on SIGTERM:\n{w2.text()[-2000:]}"
        assert w2_in_hand and w2_in_hand <= set(w2.tasks()[1]), (w2_in_hand, w2.text()[-2000:])

        deadline = time.time() + 180
        jobs = _jobs(node)
        while time.time() < deadline and (len(jobs) < n_images or any(j["state"] != "done" for j in jobs)):
            time.sleep(1)
            jobs = _jobs(node)
        states = {j["state"] for j in jobs}
        assert len(jobs) == n_images and states == {"done"}, (
            f"{sum(j['state'] == 'done' for j in jobs)} of {n_images} done: {states}\n{node.log_text()[-3000:]}"
        )
        files = sink.wait_for(4 * n_images, timeout=60)
        assert w3.stop() == 0, f"w3 did not stop cleanly on SIGTERM:\n{w3.text()[-2000:]}"
    finally:
        for w in workers:
            w.stop()
        node.stop()
        sink.stop()
        redis.stop()
    elapsed = time.time() - t_start

    # every image's 4 outputs arrived; duplicates (the killed task's re-run) are the same content
    seen: dict[str, set[str]] = {}
    for f in files:
        uid, digest = _content_hash(f)
        seen.setdefault(uid, set()).add(digest)
    assert len(seen) == 4 * n_images, f"{len(seen)} distinct objects for {n_images} images"
    changed = {uid: d for uid, d in seen.items() if len(d) > 1}
    assert not changed, f"same SOP Instance UID with different content: {list(changed)[:3]}"
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    referenced = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.SOPClassUID == DMS:
            referenced.add(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID))
    assert referenced == sources

    # the journal knows who did what: both first workers worked, the killed task was finished
    # by another worker, and every job's 4 outputs are recorded as sent
    by_id = {j["id"]: j for j in jobs}
    done_by = {j["worker"].split("@")[0] for j in jobs}
    assert {"w1", "w2"} <= done_by, done_by
    for task_id in in_hand:
        assert by_id[task_id]["state"] == "done" and not by_id[task_id]["worker"].startswith("w1@"), by_id[task_id]
        events = json.loads(_dermnode(node, "jobs", "show", task_id, "--json").stdout)["events"]
        # delivered again by the broker (acks_late), not rescued by the front end's lost-task re-dispatch
        assert sum(e["event"] == "dispatched" for e in events) == 1, events
    detail = json.loads(_dermnode(node, "jobs", "show", sorted(in_hand)[0], "--json").stdout)
    assert [(o["kind"], o["state"], o["status"]) for o in detail["outputs"]] == [
        (k, "sent", 0) for k in ("image", "seg", "pmap", "sr")]
    assert any(e["event"] == "dispatched" for e in detail["events"])
    print(f"celery scale-out test: {n_images} images, {len(files)} arrivals, {elapsed:.0f} s, "
          f"done by {sorted(done_by)}")
