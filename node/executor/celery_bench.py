"""Scale-out benchmark: throughput of 1 vs 2 (or more) ``dermnode worker`` processes in one run.

    python -m node.executor.celery_bench [--images 60] [--workers 1,2] [--threads 1] [--json FILE]

Starts its own redis-server (loopback, no persistence) and a destination (DCMTK ``storescp
--fork`` when installed, else a pynetdicom SCP in this process), then for each worker count
starts that many real ``dermnode worker --concurrency 1`` processes, warms them up (model
loaded, one task each), publishes ``n_images`` tasks exactly as the front end does (spooled
bytes in the message) and times until every result is in the backend. The front end's own
work (receive, journal, publish) is not in the timing: it is small and does not scale out.

The input is the median-sized shared fixture (1022 x 767 JPEG) when ``../shared`` is there,
else a synthetic lesion of that size. Each task gets its own SOP Instance UID.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from node.config import PACKAGE_ROOT, Settings, load_settings
from node.executor.celery_app import TASK_NAME, make_app

FIXTURE = PACKAGE_ROOT.parent / "shared" / "data" / "fixtures" / "images" / "ISIC_0000002.jpg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


def _input_dataset(path: Path | None):
    """A dermoscopy instance: a DICOM file, a JPEG to wrap, the fixture, or a synthetic lesion."""
    import pydicom

    from node.dicomize import wrap_jpeg

    if path is not None and path.suffix.lower() not in (".jpg", ".jpeg"):
        return pydicom.dcmread(path)
    if path is None and FIXTURE.exists():
        path = FIXTURE
    if path is None:
        import numpy as np
        from PIL import Image

        rows, cols = 767, 1022
        yy, xx = np.mgrid[0:rows, 0:cols]
        lesion = ((yy - rows / 2) / (rows / 4)) ** 2 + ((xx - cols / 2) / (cols / 5)) ** 2 < 1
        img = np.full((rows, cols, 3), (205, 165, 145), np.uint8)
        img[lesion] = (95, 62, 48)
        img = (img.astype(np.int16) + np.random.default_rng(0).integers(-12, 12, img.shape)).clip(0, 255)
        tmp = Path(tempfile.mkdtemp(prefix="dermnode-bench-")) / "synthetic.jpg"
        Image.fromarray(img.astype(np.uint8)).save(tmp, quality=90)
        path = tmp
    return wrap_jpeg(path)


class _Sink:
    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.proc = None
        self.server = None
        from node.ops.external import dcmtk

        exe = dcmtk("storescp")
        if exe:
            out = workdir / "sink"
            out.mkdir()
            self.proc = subprocess.Popen([exe, "-aet", "SINK", "-od", str(out), "+xa", "--fork", str(self.port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_port(self.port, self.proc)
        else:
            from pynetdicom import AE, evt

            from node.network.sopclasses import OUTPUT_ONLY_CLASSES

            ae = AE(ae_title="SINK")
            for uid in ("1.2.840.10008.5.1.4.1.1.77.1.7", "1.2.840.10008.5.1.4.1.1.77.1.4", *OUTPUT_ONLY_CLASSES):
                ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"])
            self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.server is not None:
            self.server.shutdown()


def _start_worker(env: dict, name: str, threads: int, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "dermnode"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "node.cli"]
    return subprocess.Popen(
        [*cmd, "worker", "--concurrency", "1", "--threads", str(threads), "--name", f"{name}@bench"],
        env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _wait_ready(log: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and "@bench ready." in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"worker not ready: {log}")


def _run_batch(app, queue: str, ds, n: int, tag: int) -> tuple[float, list[dict]]:
    """Publish n tasks (own SOP Instance UIDs), wait for all results; (seconds, results)."""
    created = datetime(2026, 1, 1, tzinfo=timezone.utc).isoformat()
    payloads = []
    for i in range(n):
        ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{tag}.{i + 1}"  # tag, i: digits
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        job_id = f"bench{os.getpid()}-{tag}-{i}"
        payloads.append({"job_id": job_id, "sop_instance_uid": str(ds.SOPInstanceUID), "model": "",
                         "received_at": time.time(), "created": created, "identity": {}, "dispatch": 1,
                         "data": base64.b64encode(buf.getvalue()).decode("ascii")})
    t0 = time.perf_counter()
    for p in payloads:
        app.send_task(TASK_NAME, args=[p], task_id=p["job_id"], queue=queue, routing_key=queue)
    backend = app.backend
    keys = [backend.get_key_for_task(p["job_id"]) for p in payloads]
    results: dict[str, dict] = {}
    while len(results) < n:
        for key, value in zip(keys, backend.mget(keys)):
            if value and key not in results:
                meta = backend.decode_result(value)
                if meta["status"] in ("SUCCESS", "FAILURE"):
                    results[key] = meta
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    bad = [m for m in results.values() if m["status"] != "SUCCESS" or m["result"]["state"] != "done"]
    if bad:
        raise RuntimeError(f"{len(bad)} task(s) did not finish 'done': {bad[0]}")
    return seconds, [m["result"] for m in results.values()]


def measure_scaling(
    n_images: int = 60,
    workers: tuple[int, ...] = (1, 2),
    *,
    threads: int = 1,
    input_path: Path | None = None,
    settings: Settings | None = None,
    echo=lambda msg: None,
) -> dict:
    """Images per second with each worker count, and the ratio to the first count."""
    redis_exe = shutil.which("redis-server")
    if redis_exe is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="dermnode-celery-bench-"))
    redis_port = _free_port()
    redis_proc = subprocess.Popen(
        [redis_exe, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    sink = None
    procs: list[subprocess.Popen] = []
    try:
        _wait_port(redis_port, redis_proc)
        sink = _Sink(work)
        env = dict(os.environ)
        env.update({
            "DERMNODE_EXECUTOR__KIND": "celery",
            "DERMNODE_EXECUTOR__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "DERMNODE_EXECUTOR__RESULT_BACKEND": f"redis://127.0.0.1:{redis_port}/1",
            "DERMNODE_EXECUTOR__QUEUE": "cpu",
            "DERMNODE_DESTINATION__HOST": "127.0.0.1",
            "DERMNODE_DESTINATION__PORT": str(sink.port),
            "DERMNODE_DESTINATION__AE_TITLE": "SINK",
            "DERMNODE_MODEL__DEVICE": "cpu",
            "DERMNODE_LOGGING__LEVEL": "WARNING",
        })
        s = settings or load_settings(env={k: v for k, v in env.items() if k.startswith("DERMNODE_")})
        app = make_app(s)
        ds = _input_dataset(input_path)
        runs = []
        for count in workers:
            while len(procs) < count:  # add workers to the ones already warm
                i = len(procs) + 1
                log = work / f"worker-{i}.log"
                p = _start_worker({**env, "DERMNODE_LOGGING__LEVEL": "INFO"}, f"w{i}", threads, log)
                procs.append(p)
                _wait_ready(log, p)
            _run_batch(app, "cpu", ds, 2 * count, 2 * count)  # every worker warm
            echo(f"{count} worker(s): {n_images} images ...")
            seconds, results = _run_batch(app, "cpu", ds, n_images, 2 * count + 1)
            stages = {k: round(statistics.median(r["times"][k] for r in results) * 1e3, 1)
                      for k in ("prepare", "infer", "encode", "send")}
            per_worker: dict[str, int] = {}
            for r in results:
                per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + 1
            run = {"workers": count, "seconds": round(seconds, 2), "images_per_s": round(n_images / seconds, 2),
                   "median_stage_ms": stages, "images_per_worker": per_worker}
            echo(json.dumps(run))
            runs.append(run)
        base = runs[0]["images_per_s"]
        return {
            "n_images": n_images,
            "cores": os.cpu_count(),
            "threads_per_worker": threads,
            "input": str(input_path or (FIXTURE if FIXTURE.exists() else "synthetic 1022x767")),
            "runs": runs,
            "ratio": {str(r["workers"]): round(r["images_per_s"] / base, 2) for r in runs},
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if sink is not None:
            sink.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m node.executor.celery_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts, e.g. 1,2,4")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    ap.add_argument("--input", type=Path, default=None, help="a DICOM file or a JPEG (default: fixture)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = ap.parse_args(argv)
    result = measure_scaling(a.images, tuple(int(x) for x in a.workers.split(",")), threads=a.threads,
                             input_path=a.input, echo=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
