"""``dermnode worker``: a Celery worker that runs the same pure path as the embedded executor.

One task per image (:data:`node.executor.celery_app.TASK_NAME`)::

    payload (bytes or shared path) -> derive -> encode -> C-STORE x4 -> small result

Each pool process loads the model once (before its first task) and keeps one
:class:`~node.network.scu.Sender` (one reused association). The result is small:
the worker's name, the 4 outputs (kind, SOP class, SOP instance UID, path, status) and
the final state, ``done`` or ``dead`` with the reason. The front end journals it.

Failures, as in the embedded executor and outbox:

- bad input (cannot decode, not an image): ``dead`` at once, with the reason;
- any other processing error: retried (Celery retry) up to ``retry.max_attempts``;
- transient send failure: Celery retry with the outbox's backoff, sending only the outputs
  not yet acknowledged, until ``retry.max_age_hours`` after receipt, then ``dead``;
- permanent send failure: ``dead``;
- a message delivered more than ``retry.max_attempts`` times without finishing (it kills
  the worker each time): ``dead`` as a poison job.

Outputs have deterministic UIDs and content (the creation time and equipment identity come
from the front end in the payload), so a redelivered task sends the same instances again.
Micro-batching for GPU workers can go in front of :func:`derive` (``finish`` takes batches);
the task stays one image.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pydicom

from node.config import Settings
from node.evidence.identity import NodeIdentity
from node.executor.celery_app import TASK_NAME, durable_write, make_app
from node.executor.job import KINDS, StageTimes, derive, encode
from node.network.scu import Destination, Sender, SendError
from node.network.sopclasses import OUTPUT_ONLY_CLASSES
from node.outbox import backoff
from node.pipeline.decode import DecodeError
from node.pipeline.process import ProcessOptions

log = logging.getLogger("dermnode.worker")

#: The input itself is unusable: retrying cannot help (the same list as node.executor.job.run_job).
BAD_INPUT = (DecodeError, pydicom.errors.InvalidDicomError, ValueError, KeyError, AttributeError)
#: Release the kept association after this many idle seconds, so that a PACS (or a sink that takes
#: one association at a time) is not held by an idle worker, as the outbox does when idle.
IDLE_CLOSE_S = 2.0


def destination(s: Settings) -> Destination:
    d = s.destination
    return Destination(
        ae_title=d.ae_title, host=d.host, port=d.port, calling_ae_title=s.node.ae_title, timeout=d.timeout,
        tls=d.tls, tls_ca=d.tls_ca, tls_cert=d.tls_cert, tls_key=d.tls_key,
    )


class WorkerRuntime:
    """Per-process state of a worker: the model and the sender, created in the pool process."""

    def __init__(self, settings: Settings, threads: int) -> None:
        self.settings = settings
        self.threads = threads
        self.options = ProcessOptions(max_pixels=settings.limits.max_pixels)
        self.destination = destination(settings)
        self.sop_classes = [*settings.node.sop_classes, *OUTPUT_ONLY_CLASSES]
        self.shared = Path(settings.executor.shared_storage) if settings.executor.shared_storage else None
        self._pid = -1
        self._classifier = None
        self._sender: Sender | None = None
        self._last_send = 0.0
        self._scratch: Path | None = None
        self._lock = threading.Lock()

    def _this_process(self) -> None:
        if self._pid != os.getpid():  # a forked pool process: nothing of the parent's is ours
            self._pid = os.getpid()
            self._classifier = None
            self._sender = None
            self._scratch = None
            self._lock = threading.Lock()
            threading.Thread(target=self._release_idle, name="dermnode-release-idle", daemon=True).start()

    def _release_idle(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                if self._sender is not None and self._last_send and time.monotonic() - self._last_send > IDLE_CLOSE_S:
                    self._sender.close()
                    self._last_send = 0.0

    @property
    def classifier(self):
        self._this_process()
        if self._classifier is None:
            import torch

            from node.model.classifier import Classifier

            torch.set_num_threads(self.threads)
            t0 = time.perf_counter()
            s = self.settings
            self._classifier = Classifier.load(s.model.resolved_path(), device=s.model.device)
            card = self._classifier.card
            log.info(
                "pool process %d: model %s %s on %s, %d thread(s), loaded in %.1f s",
                os.getpid(), card.model.name, card.model.version, self._classifier.device, self.threads,
                time.perf_counter() - t0,
            )
        return self._classifier

    @property
    def model_key(self) -> str:
        card = self.classifier.card
        return f"{card.model.name}:{card.model.version}"

    def scratch(self) -> Path:
        self._this_process()
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix=f"dermnode-worker-{os.getpid()}-"))
        return self._scratch

    def send(self, path: Path, sop_class: str) -> int:
        """C-STORE one file over the kept association; a dropped association is reopened once."""
        self._this_process()
        with self._lock:
            if self._sender is None:
                self._sender = Sender(self.destination, self.sop_classes)
            reused = self._sender._assoc is not None  # noqa: SLF001 - an association kept from an earlier send
            try:
                status = self._sender.send_file(path, sop_class)
            except SendError as exc:
                if not reused or not exc.transient or exc.status is not None:
                    raise  # the destination answered, or a fresh association failed: that stands
                self._sender.close()  # the kept association went stale: once more on a fresh one
                status = self._sender.send_file(path, sop_class)
            finally:
                self._last_send = time.monotonic()
        return status

    def close(self) -> None:
        if self._sender is not None and self._pid == os.getpid():
            self._sender.close()
        if self._scratch is not None and self._pid == os.getpid():
            shutil.rmtree(self._scratch, ignore_errors=True)


_RUNTIME: WorkerRuntime | None = None


def runtime() -> WorkerRuntime:
    if _RUNTIME is None:
        raise RuntimeError("the dermnode task runs in `dermnode worker` only")
    return _RUNTIME


def _count_start(app, payload: dict, task_id: str, retries: int) -> int:
    """How many times this delivery (job, dispatch, retry number) has started, all workers
    together. Kept in the Redis result backend; 1 when the backend cannot count."""
    try:
        client = app.backend.client  # RedisBackend
        key = f"dermnode:starts:{task_id}:{payload.get('dispatch', 0)}:{retries}"
        n = int(client.incr(key))
        client.expire(key, 7 * 86400)
        return n
    except Exception:  # noqa: BLE001 - not Redis, or Redis hiccup: no poison detection this time
        return 1


def _result(worker: str, state: str, outputs: list, error: str = "", **extra) -> dict:
    return {"worker": worker, "state": state, "error": error, "outputs": outputs, "pid": os.getpid(), **extra}


def process_task(task, payload: dict, progress: dict | None = None) -> dict:
    """The body of the Celery task (``task`` is the bound task: ``request``, ``retry``)."""
    rt = runtime()
    s = rt.settings
    job_id = payload["job_id"]
    extra = {"job_id": job_id}
    progress = dict(progress or {})
    sent: dict[str, int] = dict(progress.get("sent") or {})
    failures = int(progress.get("failures", 0))
    send_attempts = int(progress.get("send_attempts", 0))
    worker = task.request.hostname or socket.gethostname()
    starts = _count_start(task.app, payload, task.request.id or job_id, task.request.retries or 0)
    if starts > s.retry.max_attempts:
        reason = f"poison job: delivered {starts} times, {starts - 1} did not finish"
        log.error("job %s dead-lettered: %s", job_id, reason, extra=extra)
        return _result(worker, "dead", [], reason)

    # -- process --------------------------------------------------------------------
    retry_processing: Exception | None = None
    times = StageTimes()
    try:
        if "data" in payload:
            raw = base64.b64decode(payload["data"])
        else:
            raw = Path(payload["path"]).read_bytes()
        source = pydicom.dcmread(io.BytesIO(raw))
        created = datetime.fromisoformat(payload["created"])
        identity = NodeIdentity(**payload.get("identity", {}))
        evidence, derived = derive(source, rt.classifier, identity, rt.options, created, times)
        t0 = time.perf_counter()
        encoded = [(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), encode(ds)) for kind, ds in zip(KINDS, derived)]
        times.encode += time.perf_counter() - t0
    except BAD_INPUT as exc:
        reason = f"bad input: {type(exc).__name__}: {exc}"
        log.warning("job %s dead-lettered: %s", job_id, reason, extra=extra)
        return _result(worker, "dead", [], reason)
    except Exception as exc:  # noqa: BLE001 - anything else may be transient (OOM, CUDA, I/O)
        failures += 1
        reason = f"{type(exc).__name__}: {exc}"
        if failures >= s.retry.max_attempts:
            log.error("job %s dead-lettered after %d attempts: %s", job_id, failures, reason, extra=extra)
            return _result(worker, "dead", [], f"failed {failures} times, last: {reason}")
        log.warning("job %s failed on %s (attempt %d), will retry: %s", job_id, worker, failures, reason, extra=extra)
        retry_processing = exc
    if retry_processing is not None:
        raise task.retry(
            kwargs={"progress": {**progress, "failures": failures}}, countdown=5.0 * failures, max_retries=None,
            exc=RuntimeError(f"processing failed on {worker} (attempt {failures}), retry in {5 * failures} s:"
                             f" {type(retry_processing).__name__}: {retry_processing}"),
        )
    if payload.get("model") and payload["model"] != rt.model_key:
        log.warning("job %s was received for model %s; this worker runs %s", job_id, payload["model"], rt.model_key,
                    extra=extra)

    # -- write and send ----------------------------------------------------------------
    shared = rt.shared is not None and "path" in payload
    out_dir = (rt.shared / "out" / job_id) if shared else (rt.scratch() / job_id)
    files = []
    for kind, cls_uid, inst_uid, data in encoded:
        path = out_dir / f"{kind}.dcm"
        if shared:
            durable_write(path, data)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        files.append((kind, cls_uid, inst_uid, path))

    def outputs(only_sent: bool) -> list:
        return [
            [kind, cls_uid, inst_uid, str(path) if shared else "", sent.get(kind)]
            for kind, cls_uid, inst_uid, path in files
            if not only_sent or kind in sent
        ]

    t0 = time.perf_counter()
    send_error: SendError | None = None
    try:
        for kind, cls_uid, _, path in files:
            if kind not in sent:
                sent[kind] = rt.send(path, cls_uid)
    except SendError as exc:
        send_error = exc
    finally:
        if not shared:
            shutil.rmtree(out_dir, ignore_errors=True)
    send_s = time.perf_counter() - t0
    timing = {"prepare": times.prepare, "infer": times.infer, "encode": times.encode, "send": send_s}

    if send_error is not None:
        # Unsent outputs are reported only where the front end can read them (shared storage),
        # so that `jobs retry` of a dead job either resends those files or processes again.
        exc = send_error
        max_age = s.retry.max_age_hours * 3600
        if not exc.transient:
            log.error("job %s dead-lettered: permanent send failure: %s", job_id, exc, extra=extra)
            return _result(worker, "dead", outputs(not shared), f"permanent send failure: {exc}", times=timing)
        if time.time() - float(payload["received_at"]) > max_age:
            reason = f"not delivered within {max_age / 3600:.1f} h: {exc}"
            log.error("job %s dead-lettered: %s", job_id, reason, extra=extra)
            return _result(worker, "dead", outputs(not shared), reason, times=timing)
        delay = min(backoff(send_attempts, s.retry.initial_delay, s.retry.max_delay),
                    task.app.dermnode_broker.max_countdown)
        log.warning("job %s send failed (transient), retry in %.0f s: %s", job_id, delay, exc, extra=extra)
        raise task.retry(
            kwargs={"progress": {"sent": sent, "failures": failures, "send_attempts": send_attempts + 1}},
            countdown=delay, max_retries=None,
            # what the front end sees while the task waits (backend state RETRY)
            exc=RuntimeError(f"send failed on {worker}, retry in {delay:.0f} s: {exc}"),
        )

    top = evidence.top_class
    log.info(
        "job %s done on %s: top class %s p=%.3f, segmentation %s; prepare %.0f ms, infer %.0f ms, encode %.0f ms,"
        " send %.0f ms",
        job_id, worker, top.code, float(evidence.probabilities[evidence.top_index]),
        "ok" if evidence.segmentation.ok else f"failed ({evidence.segmentation.failure})",
        times.prepare * 1e3, times.infer * 1e3, times.encode * 1e3, send_s * 1e3,
        extra=extra,
    )
    return _result(worker, "done", outputs(False), times=timing, model=rt.model_key)


def register_task(app):
    """Bind :func:`process_task` to ``app`` under :data:`TASK_NAME`."""

    @app.task(
        bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, max_retries=None,
        # time limits would kill a pool process mid-C-STORE; the DIMSE timeouts bound a send
        time_limit=None, soft_time_limit=None, resultrepr_maxsize=200,
    )
    def process(self, payload: dict, progress: dict | None = None) -> dict:
        return process_task(self, payload, progress)

    return process


def run_worker(
    settings: Settings,
    *,
    queue: str,
    concurrency: int = 1,
    threads: int = 0,
    name: str | None = None,
) -> None:
    """Run a Celery worker on ``queue`` until SIGTERM (warm shutdown: the tasks in hand finish,
    their messages are acknowledged; nothing else is taken)."""
    global _RUNTIME
    from celery import signals

    from node.ops.logs import setup_logging

    setup_logging(settings.logging.level, settings.logging.format)
    threads = threads or max(1, (os.cpu_count() or 1) // concurrency)
    _RUNTIME = WorkerRuntime(settings, threads)
    app = make_app(settings)
    register_task(app)
    import torch  # noqa: F401 - imported once in the parent; the model itself loads in each pool process

    @signals.worker_process_init.connect(weak=False)
    def _load_model(**_kw) -> None:
        runtime().classifier  # noqa: B018 - warm: load before the first task

    @signals.worker_process_shutdown.connect(weak=False)
    def _close(**_kw) -> None:
        if _RUNTIME is not None:
            _RUNTIME.close()

    node_name = name or f"dermnode-{queue}-{os.getpid()}@%h"
    log.info(
        "worker %s: queue %s, %d process(es) x %d thread(s), broker %s, destination %s@%s:%d",
        node_name, queue, concurrency, threads, app.dermnode_broker.scheme, settings.destination.ae_title,
        settings.destination.host, settings.destination.port,
    )
    app.worker_main([
        "worker", "--queues", queue, "--concurrency", str(concurrency), "--hostname", node_name,
        "--pool", "prefork", "--loglevel", settings.logging.level, "--without-mingle", "--without-gossip",
        "--prefetch-multiplier", "1", "-O", "fair",
    ])
