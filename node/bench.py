"""``dermnode bench``: how fast the node is, and which limit it runs at.

Everything runs in one process tree on loopback, on the shared dermoscopy
fixtures wrapped as they are (JPEG Baseline, real sizes, one new SOP Instance
UID per image sent):

* **compute ceiling**: the pipeline in this process, no network, no journal:
  read -> decode -> frame -> segment -> classify+CAM -> build + serialise the
  four objects, with the node's ``[processing]`` settings (worker threads,
  pool, batching, torch threads). Images/s over a burst, and each stage's
  median time per image from a separate one-at-a-time pass.
* **model**: classify + Grad-CAM vs a forward pass alone, per image (ratio).
* **ingest ceiling**: DCMTK ``storescu`` into DCMTK ``storescp``, the same
  files over the same number of associations (images/s).
* **end to end**: ``dermnode serve`` in a subprocess, fed by a pynetdicom SCU
  in this process over K associations, sending its four results to a DCMTK
  ``storescp`` sink. Per image, latency runs from the moment the source got
  its C-STORE response (the image is durably stored by the node) to the
  moment the last of its four derived objects was written by the sink (the
  file's mtime; storescp answers the C-STORE after writing it). Throughput is
  images / (last object at the sink - first C-STORE sent). Two load profiles:
  *light* (one image a second, 1022x767 inputs) and *burst* (all at once).
* **memory**: peak RSS of the node process and of its pool workers during the
  run (sampled from /proc, plus the kernel's VmHWM of the node).

Each measured section runs ``repeat`` times, interleaved, and the medians are
reported. Nothing here asserts a time: the targets are printed beside the
figures. The machine may be shared; compare ratios taken in one run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.config import PACKAGE_ROOT, Settings, load_settings

#: Images per section for each size; ``repeat`` is the default number of repeats.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(compute=4, burst=6, light=3, associations=2, model_images=2, model_rounds=3, repeat=1),
    "small": dict(compute=29, burst=60, light=10, associations=4, model_images=6, model_rounds=5, repeat=1),
    "full": dict(compute=58, burst=300, light=30, associations=4, model_images=12, model_rounds=10, repeat=3),
}

TARGETS = {
    "model_ratio_max": 1.15,
    "e2e_to_compute_min": 0.8,
    "encode_to_inference_max": 1.0,
    "light_p50_max_s": 1.0,
    "light_p99_max_s": 2.0,
    "peak_rss_max_mb": 2048,
}

NODE_AE = "DERMNODE"
SINK_AE = "BENCHSINK"
SOURCE_AE = "BENCHSCU"
LIGHT_SIZE = (1022, 767)


# --- small helpers ---------------------------------------------------------------------------


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def steady_rate(done_times: list[float]) -> float | None:
    """Images/s between the 10th and the 90th percentile of completion times.

    The pipeline's fill (the first image has nothing to overlap with) and drain
    (the last ones leave stages idle) are left out, the same way for the
    in-process ceiling and for the node.
    """
    t = sorted(done_times)
    n = len(t)
    if n < 3:
        return None
    lo, hi = int(0.1 * n), max(int(0.1 * n) + 1, -(-9 * n // 10) - 1)
    span = t[hi] - t[lo]
    return (hi - lo) / span if span > 0 else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f} s")


#: DCMTK >= 3.6.2 leaves Nagle's algorithm on unless this variable says otherwise; with it
#: on, every DIMSE response to a pynetdicom peer waits ~40 ms for a delayed ACK (Orthanc's
#: builds turn it off: DISABLE_NAGLE_ALGORITHM). The bench's DCMTK peers run with it off,
#: unless DERMNODE_BENCH_DCMTK_NAGLE=1 asks for stock DCMTK behaviour.
DCMTK_NODELAY = {"TCP_NODELAY": "1"}


def dcmtk_nagle() -> bool:
    return os.environ.get("DERMNODE_BENCH_DCMTK_NAGLE", "") not in ("", "0")


def _dcmtk_env(nagle: bool) -> dict:
    env = dict(os.environ)
    if nagle:
        env["TCP_NODELAY"] = "0"
    else:
        env.update(DCMTK_NODELAY)
    return env


def _tool(name: str) -> str:
    from node.ops.external import dcmtk

    path = dcmtk(name)
    if not path:
        raise SystemExit(f"dermnode bench: {name} (DCMTK) is not installed")
    return path


def fixtures_dir() -> Path:
    """The shared fixtures: ``DERMNODE_FIXTURES``, else ``../shared/data/fixtures`` beside the repository."""
    env = os.environ.get("DERMNODE_FIXTURES")
    return Path(env) if env else PACKAGE_ROOT.parent / "shared" / "data" / "fixtures"


def fixture_rows(root: Path) -> list[dict]:
    with open(root / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return sorted(rows, key=lambda r: r["isic_id"])


def write_inputs(out: Path, rows: list[dict], n: int, tag: str, root: Path) -> list[Path]:
    """``n`` DICOM files cycling through ``rows``, each a new SOP instance of one study."""
    from node.dicomize import _uid, wrap_jpeg

    out.mkdir(parents=True, exist_ok=True)
    study, series = _uid("bench-study", tag), _uid("bench-series", tag)
    paths = []
    for i in range(n):
        r = rows[i % len(rows)]
        ds = wrap_jpeg(
            root / r["file"], patient_name="Bench^Fixture", patient_id="BENCH0001",
            study_uid=study, series_uid=series, sop_uid=_uid("bench", tag, str(i)),
        )
        ds.InstanceNumber = i + 1
        p = out / f"{tag}-{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


# --- memory -------------------------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in (pid, *_children(pid)):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


class RssSampler:
    """Samples the RSS of a process and its children every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_total_kb = 0
        self.peak_main_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-rss")

    def _run(self) -> None:
        while not self._stop.is_set():
            main = _status_kb(self.pid, "VmRSS")
            total = main + sum(_status_kb(c, "VmRSS") for c in _children(self.pid))
            self.peak_main_kb = max(self.peak_main_kb, main)
            self.peak_total_kb = max(self.peak_total_kb, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


# --- compute ceiling and model ------------------------------------------------------------------


@dataclass
class Runtime:
    """The node's processing runtime, built in this process from the same settings."""

    classifier: object
    settings: Settings
    stages: object = None
    batcher: object = None
    inference_threads: int = 0

    @classmethod
    def start(cls, settings: Settings) -> Runtime:
        import torch

        from node.evidence.identity import NodeIdentity
        from node.executor.batching import MicroBatcher
        from node.executor.local import auto_inference_threads, auto_max_batch
        from node.executor.pool import Stages
        from node.model.classifier import Classifier
        from node.pipeline.process import ProcessOptions

        p = settings.processing
        clf = Classifier.load(settings.model.resolved_path(), device=settings.model.device)
        threads = 0
        if clf.device.type == "cpu":
            threads = p.inference_threads or auto_inference_threads(p.workers, p.pool_workers)
            torch.set_num_threads(threads)
        stages = Stages(clf.card, ProcessOptions(max_pixels=settings.limits.max_pixels), NodeIdentity(), p.pool_workers)
        batch = auto_max_batch(clf.device.type, p.max_batch)
        batcher = MicroBatcher(clf, max_batch=batch, max_wait=p.batch_wait_ms / 1000).start() if batch > 1 else None
        return cls(clf, settings, stages, batcher, threads)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        if self.stages is not None:
            self.stages.close()


def _classify_one(rt: Runtime, prepared):
    from node.pipeline.process import classify

    if rt.batcher is not None:
        return rt.batcher.classify(prepared)
    probs, cams = classify([prepared], rt.classifier)
    return probs[0], cams[0]


def stage_breakdown(rt: Runtime, files: list[Path]) -> dict:
    """One image at a time, in this thread: each stage's median time (ms) per image."""
    import pydicom

    from node.evidence.identity import NodeIdentity
    from node.executor.pool import encode_evidence
    from node.pipeline.process import ProcessOptions, assemble, classify, prepare

    options = ProcessOptions(max_pixels=rt.settings.limits.max_pixels)
    identity = NodeIdentity()
    created = _dt.datetime.now().astimezone()
    rows: list[dict] = []
    prepared_all = []
    warm = pydicom.dcmread(files[0])  # first-call costs (imports, caches) are not a stage's
    warm_prepared = prepare(warm, rt.classifier, options)
    encode_evidence(warm, assemble(warm_prepared, *[x[0] for x in classify([warm_prepared], rt.classifier)],
                                   rt.classifier.card), identity, created)
    for path in files:
        t: dict = {}
        t0 = time.perf_counter()
        ds = pydicom.dcmread(path)
        t["read"] = time.perf_counter() - t0
        prepared = prepare(ds, rt.classifier, options, t)
        t1 = time.perf_counter()
        probs, cams = classify([prepared], rt.classifier)
        t["classify_cam"] = time.perf_counter() - t1
        evidence = assemble(prepared, probs[0], cams[0], rt.classifier.card)
        encode_evidence(ds, evidence, identity, created, t)
        t["encode"] = t["build"] + t["serialise"]
        rows.append(t)
        prepared_all.append(prepared)
    keys = ("read", "decode", "frame", "segment", "classify_cam", "build", "serialise", "encode")
    out = {k: _median(r[k] * 1e3 for r in rows) for k in keys}
    out["total"] = sum(out[k] for k in ("read", "decode", "frame", "segment", "classify_cam", "encode"))
    return {"stages_ms": out, "prepared": prepared_all}


def compute_throughput(rt: Runtime, files: list[Path]) -> dict:
    """The node's processing path without network or journal: images/s over a burst."""
    from node.pipeline.process import assemble

    work: queue.Queue = queue.Queue()
    for p in files:
        work.put(p)
    created = _dt.datetime.now().astimezone()
    errors: list[BaseException] = []
    done: list[float] = []

    def worker() -> None:
        while True:
            try:
                path = work.get_nowait()
            except queue.Empty:
                return
            try:
                source = None
                if rt.stages.pool_workers == 0:
                    import pydicom

                    source = pydicom.dcmread(path)
                prepared = rt.stages.prepare(str(path), source)
                probs, cam = _classify_one(rt, prepared)
                evidence = assemble(prepared, probs, cam, rt.classifier.card)
                rt.stages.encode(str(path), evidence, created, source)
                done.append(time.perf_counter())
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(rt.settings.processing.workers)]
    pool_cpu0 = sum(cpu_seconds(pid) for pid in rt.stages.worker_pids())
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 + sum(cpu_seconds(pid) for pid in rt.stages.worker_pids()) - pool_cpu0
    if errors:
        raise RuntimeError(f"compute pass failed: {errors[0]!r}") from errors[0]
    return {"images": len(files), "seconds": wall, "images_per_s": len(files) / wall,
            "steady_images_per_s": steady_rate(done), "cpu_ms_per_image": cpu / len(files) * 1e3}


def model_ratio(rt: Runtime, prepared: list, rounds: int) -> dict:
    """Forward pass alone vs classify + Grad-CAM, per image, interleaved."""
    import numpy as np

    clf = rt.classifier
    fwd, full = [], []
    for p in prepared[:1]:  # warm both paths
        clf.forward_only(p.model_input[None], [p.metadata])
        clf.predict(p.model_input[None], [p.metadata])
    for _ in range(rounds):
        for p in prepared:
            x = np.ascontiguousarray(p.model_input[None])
            t0 = time.perf_counter()
            clf.forward_only(x, [p.metadata])
            t1 = time.perf_counter()
            clf.predict(x, [p.metadata])
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            full.append(t2 - t1)
    f, c = _median(fwd) * 1e3, _median(full) * 1e3
    return {"forward_ms": f, "classify_cam_ms": c, "ratio": c / f, "samples": len(fwd)}


# --- peers --------------------------------------------------------------------------------------


@dataclass
class Sink:
    """DCMTK storescp writing each received object to ``dir`` (file mtime = arrival)."""

    dir: Path
    aet: str = SINK_AE
    port: int = field(default_factory=_free_port)
    nagle: bool = field(default_factory=dcmtk_nagle)
    proc: subprocess.Popen | None = None

    def start(self) -> Sink:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir.parent / f"storescp-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [_tool("storescp"), "-aet", self.aet, "-od", str(self.dir), "+xa", "-dhl", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=_dcmtk_env(self.nagle),
        )
        _wait_port(self.port, 20, self.proc)
        return self

    def arrivals(self) -> dict[str, float]:
        """SOP Instance UID -> time the object was written."""
        out = {}
        with os.scandir(self.dir) as it:
            for e in it:
                if e.is_file() and "." in e.name:
                    out[e.name.split(".", 1)[1]] = e.stat().st_mtime
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class NodeProc:
    """``dermnode serve`` in a subprocess, configured like the node under test plus loopback peers."""

    storage: Path
    sink: Sink
    config: Path | None
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def start(self, timeout: float = 180) -> NodeProc:
        env = dict(os.environ)
        env.update({
            "DERMNODE_NODE__PORT": str(self.port),
            "DERMNODE_NODE__BIND": "127.0.0.1",
            "DERMNODE_NODE__AE_TITLE": NODE_AE,
            "DERMNODE_NODE__ALLOWED_CALLING_AETS": json.dumps([SOURCE_AE]),
            "DERMNODE_DESTINATION__PORT": str(self.sink.port),
            "DERMNODE_DESTINATION__AE_TITLE": self.sink.aet,
            "DERMNODE_DESTINATION__HOST": "127.0.0.1",
            "DERMNODE_STORAGE__DIR": str(self.storage),
            "DERMNODE_STORAGE__MIN_FREE_MB": "64",
            "DERMNODE_HTTP__PORT": "0",
        })
        cmd = [sys.executable, "-m", "node.cli", "serve"]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        self.storage.mkdir(parents=True, exist_ok=True)
        self.log = self.storage.parent / "node.log"
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=PACKAGE_ROOT)
        _wait_port(self.port, timeout, self.proc)
        return self

    def stop(self, timeout: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Source:
    """A pynetdicom SCU: sends files over its own associations and notes each response time."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE, _config
        from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

        from node.config import DERMOSCOPIC

        _config.STORE_SEND_CHUNKED_DATASET = True  # send the files as they are, like a PACS
        self.port = port
        self.ae = AE(ae_title=SOURCE_AE)
        # One context per transfer syntax: an SCP accepts one syntax per context.
        self.ae.add_requested_context(DERMOSCOPIC, JPEGBaseline8Bit)
        self.ae.add_requested_context(DERMOSCOPIC, ExplicitVRLittleEndian)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 120

    def send(self, files: list[Path], *, rate: float | None = None) -> dict[Path, tuple[float, float]]:
        """Send over one association; ``rate`` images/s, else as fast as possible.

        Returns path -> (time sent, time the success response arrived).
        """
        assoc = self.ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
        if not assoc.is_established:
            raise RuntimeError("the node refused the benchmark's association")
        out = {}
        start = time.time()
        try:
            for i, path in enumerate(files):
                if rate:
                    delay = start + i / rate - time.time()
                    if delay > 0:
                        time.sleep(delay)
                t0 = time.time()
                rsp = assoc.send_c_store(path)
                t1 = time.time()
                status = getattr(rsp, "Status", None)
                if status != 0:
                    raise RuntimeError(f"C-STORE of {path.name} answered {status!r}")
                out[path] = (t0, t1)
        finally:
            assoc.release()
        return out

    def send_parallel(self, files: list[Path], associations: int) -> dict[Path, tuple[float, float]]:
        shares = [files[i::associations] for i in range(associations)]
        results: dict[Path, tuple[float, float]] = {}
        errors: list[BaseException] = []

        def run(share: list[Path]) -> None:
            try:
                results.update(self.send(share))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in shares if s]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def ingest_ceiling(files: list[Path], associations: int, work: Path, nagle: bool | None = None) -> dict:
    """DCMTK storescu (K processes, one association each) into DCMTK storescp."""
    nagle = dcmtk_nagle() if nagle is None else nagle
    sink = Sink(work / "ingest-sink", aet="INGEST", nagle=nagle).start()
    try:
        profile = PACKAGE_ROOT / "config" / "dcmtk" / "storescu-dermoscopy.cfg"
        shares = [files[i::associations] for i in range(associations)]
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                [_tool("storescu"), "-aet", SOURCE_AE, "-aec", sink.aet, "-xf", str(profile), "Dermoscopy",
                 "127.0.0.1", str(sink.port), *map(str, share)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_dcmtk_env(nagle),
            )
            for share in shares if share
        ]
        for p in procs:
            _, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
        wall = time.perf_counter() - t0
        return {"images": len(files), "seconds": wall, "images_per_s": len(files) / wall}
    finally:
        sink.stop()
        shutil.rmtree(sink.dir, ignore_errors=True)


def _expected_outputs(files: list[Path], card) -> dict[Path, list[str]]:
    import pydicom

    from node.evidence import uids

    out = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[path] = [uids.instance_uid(ds, card, kind) for kind in ("image", "seg", "pmap", "sr")]
    return out


def _wait_arrivals(sink: Sink, expected: dict[Path, list[str]], timeout: float, node: NodeProc) -> dict[str, float]:
    wanted = {u for uids_ in expected.values() for u in uids_}
    deadline = time.time() + timeout
    while True:
        got = sink.arrivals()
        if wanted <= got.keys():
            time.sleep(0.2)  # let storescp finish the last file
            return sink.arrivals()
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"the node exited with status {node.proc.returncode}; see {node.log}")
        if time.time() > deadline:
            missing = len(wanted - got.keys())
            raise TimeoutError(f"{missing} of {len(wanted)} derived objects did not reach the sink in {timeout:.0f} s")
        time.sleep(0.1)


def end_to_end(source: Source, sink: Sink, node: NodeProc, files: list[Path], card, *, associations: int,
               rate: float | None, timeout: float) -> dict:
    expected = _expected_outputs(files, card)
    os.sync()  # the inputs just written must not be flushed during the node's own fsyncs
    node_cpu0, source_cpu0 = cpu_seconds(node.proc.pid), time.process_time()
    if rate:
        sent = source.send(files, rate=rate)
    else:
        sent = source.send_parallel(files, associations)
    source_cpu = time.process_time() - source_cpu0
    arrivals = _wait_arrivals(sink, expected, timeout, node)
    node_cpu = cpu_seconds(node.proc.pid) - node_cpu0
    latencies, done_times = [], []
    last = 0.0
    for path, (_t_sent, t_ack) in sent.items():
        done = max(arrivals[u] for u in expected[path])
        latencies.append(done - t_ack)
        done_times.append(done)
        last = max(last, done)
    first = min(t for t, _ in sent.values())
    wall = last - first
    return {
        "images": len(files),
        "associations": 1 if rate else associations,
        "rate_per_s": rate,
        "seconds": wall,
        "images_per_s": len(files) / wall if wall > 0 else None,
        "steady_images_per_s": None if rate else steady_rate(done_times),
        "latency_s": {q: _percentile(latencies, float(q[1:])) for q in ("p50", "p95", "p99")},
        "latency_max_s": max(latencies),
        "source_cstore_max_s": max(t1 - t0 for t0, t1 in sent.values()),
        "node_cpu_ms_per_image": node_cpu / len(files) * 1e3,
        "source_cpu_ms_per_image": source_cpu / len(files) * 1e3,
    }


# --- the run --------------------------------------------------------------------------------------


def _summarise(runs: list[dict], key: str) -> dict | None:
    items = [r[key] for r in runs if r.get(key)]
    if not items:
        return None
    out = dict(items[0])
    for k in ("seconds", "images_per_s", "steady_images_per_s", "latency_max_s", "cpu_ms_per_image",
              "node_cpu_ms_per_image", "source_cpu_ms_per_image"):
        if k in out:
            out[k] = _median(i[k] for i in items)
    if "latency_s" in out:
        out["latency_s"] = {q: _median(i["latency_s"][q] for i in items) for q in out["latency_s"]}
    out["repeats"] = [{k: i[k] for k in ("images_per_s", "latency_s") if k in i} for i in items]
    return out


def run(size: str = "small", repeat: int | None = None, config: Path | None = None, echo=print,
        work: Path | None = None, burst: int | None = None) -> dict:
    """Run the benchmark and return the results (see :data:`SIZES`; ``burst`` overrides its burst size)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    plan = dict(SIZES[size])
    if burst:
        plan["burst"] = burst
    repeats = repeat or plan["repeat"]
    root = fixtures_dir()
    if not (root / "labels.csv").is_file():
        raise SystemExit(f"dermnode bench: fixtures not found at {root} (set DERMNODE_FIXTURES)")
    settings = load_settings(config)
    rows = fixture_rows(root)
    light_rows = [r for r in rows if (int(r["width"]), int(r["height"])) == LIGHT_SIZE] or rows

    own_work = work is None and not os.environ.get("DERMNODE_BENCH_KEEP")  # keep logs to debug a run
    work = Path(tempfile.mkdtemp(prefix="dermnode-bench-")) if work is None else work
    results: dict = {
        "size": size, "repeat": repeats, "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average_1m": os.getloadavg()[0],
        },
        "targets": TARGETS,
        "dcmtk_nagle": dcmtk_nagle(),
    }
    rt = node = sink = None
    try:
        echo(f"dermnode bench: size {size}, {repeats} repeat(s), fixtures {root}, work {work}")
        inputs = work / "inputs"
        rt = Runtime.start(settings)
        card = rt.classifier.card
        p = settings.processing
        results["config"] = {
            "model": f"{card.model.name} {card.model.version}", "device": str(rt.classifier.device),
            "workers": p.workers, "pool_workers": p.pool_workers,
            "max_batch": (rt.batcher.max_batch if rt.batcher else 1), "batch_wait_ms": p.batch_wait_ms,
            "inference_threads": rt.inference_threads or None,
        }
        echo(f"  model {card.model.name} {card.model.version} on {rt.classifier.device}; "
             f"workers {p.workers}, pool {p.pool_workers}, torch threads {rt.inference_threads or '-'}")

        compute_files = write_inputs(inputs / "compute", rows, plan["compute"], "compute", root)
        echo(f"  stage breakdown on {len(compute_files)} images ...")
        breakdown = stage_breakdown(rt, compute_files)
        results["stages_ms"] = breakdown["stages_ms"]
        echo("  model: forward vs classify+CAM ...")
        results["model"] = model_ratio(rt, breakdown["prepared"][: plan["model_images"]], plan["model_rounds"])
        del breakdown

        sink = Sink(work / "sink").start()
        node = NodeProc(work / "node", sink, config).start()
        source = Source(node.port)
        echo(f"  node up (pid {node.proc.pid}); warming up ...")
        warm = write_inputs(inputs / "warm", light_rows, 2, "warm", root)
        end_to_end(source, sink, node, warm, card, associations=1, rate=None, timeout=300)

        runs = []
        with RssSampler(node.proc.pid) as rss:
            for r in range(repeats):
                one: dict = {}
                burst = write_inputs(inputs / f"burst{r}", rows, plan["burst"], f"burst{r}", root)
                light = write_inputs(inputs / f"light{r}", light_rows, plan["light"], f"light{r}", root)
                echo(f"  [{r + 1}/{repeats}] compute ceiling ({len(burst)} images) ...")
                one["compute"] = compute_throughput(rt, burst)
                echo(f"  [{r + 1}/{repeats}] ingest ceiling ...")
                one["ingest"] = ingest_ceiling(burst, plan["associations"], work)
                echo(f"  [{r + 1}/{repeats}] end to end, light ({len(light)} images at 1/s) ...")
                one["light"] = end_to_end(source, sink, node, light, card, associations=1, rate=1.0, timeout=600)
                echo(f"  [{r + 1}/{repeats}] end to end, burst ({len(burst)} images, {plan['associations']} associations) ...")
                one["burst"] = end_to_end(source, sink, node, burst, card, associations=plan["associations"],
                                          rate=None, timeout=max(600, 10 * len(burst)))
                one["e2e_to_compute"] = one["burst"]["images_per_s"] / one["compute"]["images_per_s"]
                if one["burst"]["steady_images_per_s"] and one["compute"]["steady_images_per_s"]:
                    one["e2e_to_compute_steady"] = (one["burst"]["steady_images_per_s"]
                                                    / one["compute"]["steady_images_per_s"])
                runs.append(one)
        results["compute"] = _summarise(runs, "compute")
        results["compute"]["stages_ms"] = results.pop("stages_ms")
        results["ingest"] = _summarise(runs, "ingest")
        results["e2e"] = {
            "light": _summarise(runs, "light"),
            "burst": _summarise(runs, "burst"),
            "to_compute_ratio": _median(r["e2e_to_compute"] for r in runs),
            "to_compute_ratio_steady": _median(r.get("e2e_to_compute_steady") for r in runs),
        }
        stages = results["compute"]["stages_ms"]
        results["encode_to_inference"] = {
            "encode_ms": stages["encode"], "inference_ms": stages["classify_cam"],
            "ratio": stages["encode"] / stages["classify_cam"],
        }
        results["memory"] = {
            "node_peak_rss_mb": rss.peak_main_kb / 1024,
            "node_and_workers_peak_rss_mb": rss.peak_total_kb / 1024,
            "node_vmhwm_mb": _status_kb(node.proc.pid, "VmHWM") / 1024,
        }
        results["checks"] = checks(results)
        results["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        return results
    finally:
        if node is not None:
            node.stop()
        if sink is not None:
            sink.stop()
        if rt is not None:
            rt.close()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def checks(r: dict) -> dict[str, bool]:
    t = TARGETS
    light = r["e2e"]["light"]["latency_s"]
    return {
        "model_ratio": r["model"]["ratio"] <= t["model_ratio_max"],
        "e2e_to_compute": (r["e2e"]["to_compute_ratio_steady"] or r["e2e"]["to_compute_ratio"]) >= t["e2e_to_compute_min"],
        "encode_to_inference": r["encode_to_inference"]["ratio"] <= t["encode_to_inference_max"],
        "light_latency": light["p50"] <= t["light_p50_max_s"] and light["p99"] <= t["light_p99_max_s"],
        "memory": r["memory"]["node_and_workers_peak_rss_mb"] < t["peak_rss_max_mb"],
    }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(r: dict) -> str:
    """The results as a text table."""
    def ok(name: str) -> str:
        return "ok" if r["checks"][name] else "MISSED"

    s = r["compute"]["stages_ms"]
    c = r["config"]
    b, lt = r["e2e"]["burst"], r["e2e"]["light"]
    lines = [
        f"dermnode bench  size {r['size']}, {r['repeat']} repeat(s), {r['machine']['cores']} cores "
        f"(load {r['machine']['load_average_1m']:.1f} at start)",
        f"model {c['model']} on {c['device']}; workers {c['workers']}, pool {c['pool_workers']}, "
        f"batch {c['max_batch']}, torch threads {c['inference_threads'] or '-'}; DCMTK peers with Nagle "
        f"{'on (stock)' if r.get('dcmtk_nagle') else 'off (TCP_NODELAY=1)'}",
        "",
        f"{'measure':44s} {'median':>16s}   target",
        f"{'compute ceiling (in-process, no network)':44s} {r['compute']['images_per_s']:12.2f} img/s"
        f"  (steady {_fmt(r['compute']['steady_images_per_s'])})",
        f"{'  per image: read / decode / frame':44s} {s['read']:5.1f} /{s['decode']:5.1f} /{s['frame']:5.1f} ms",
        f"{'  segment / classify+CAM':44s} {s['segment']:8.1f} /{s['classify_cam']:6.1f} ms",
        f"{'  encode 4 objects (build + serialise)':44s} {s['encode']:8.1f} ms ({s['build']:.1f} + {s['serialise']:.1f})",
        f"{'model: classify+CAM / forward only':44s} {r['model']['ratio']:16.2f}   <= {TARGETS['model_ratio_max']}  {ok('model_ratio')}"
        f"  ({r['model']['classify_cam_ms']:.1f} / {r['model']['forward_ms']:.1f} ms)",
        f"{'encode / inference':44s} {r['encode_to_inference']['ratio']:16.2f}   <= {TARGETS['encode_to_inference_max']}   {ok('encode_to_inference')}",
        f"{'ingest ceiling (storescu -> storescp)':44s} {r['ingest']['images_per_s']:12.2f} img/s",
        f"{'end to end, burst':44s} {b['images_per_s']:12.2f} img/s  (steady {_fmt(b['steady_images_per_s'])}; "
        f"{b['images']} images, {b['associations']} associations)",
        f"{'  latency p50 / p95 / p99 (max)':44s} {b['latency_s']['p50']:6.2f} /{b['latency_s']['p95']:6.2f} /{b['latency_s']['p99']:6.2f} s"
        f"  ({b['latency_max_s']:.2f} s)",
        f"{'  end to end / compute ceiling, steady':44s} {_fmt(r['e2e']['to_compute_ratio_steady']):>16s}   >= "
        f"{TARGETS['e2e_to_compute_min']}   {ok('e2e_to_compute')}  (whole run {r['e2e']['to_compute_ratio']:.2f})",
        f"{'end to end, light (1 image/s, 1022x767)':44s} {lt['images']:9d} images",
        f"{'  latency p50 / p95 / p99':44s} {lt['latency_s']['p50']:6.2f} /{lt['latency_s']['p95']:6.2f} /{lt['latency_s']['p99']:6.2f} s"
        f"   p50 <= {TARGETS['light_p50_max_s']:g}, p99 <= {TARGETS['light_p99_max_s']:g}  {ok('light_latency')}",
        f"{'peak RSS, node (+ pool workers)':44s} {r['memory']['node_peak_rss_mb']:8.0f} ({r['memory']['node_and_workers_peak_rss_mb']:.0f}) MB"
        f"   < {TARGETS['peak_rss_max_mb']}  {ok('memory')}",
    ]
    return "\n".join(lines)


def main(size: str = "small", repeat: int | None = None, json_path: Path | None = None,
         config: Path | None = None, burst: int | None = None) -> int:
    """The ``dermnode bench`` command: progress on stderr, the table on stdout, JSON on request."""
    results = run(size=size, repeat=repeat, config=config, burst=burst,
                  echo=lambda m: print(m, file=sys.stderr, flush=True))
    print(table(results))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0
