"""The front end's side of the distributed executor (``executor.kind = "celery"``).

The DIMSE front end still stores every image durably and journals it; nothing about
intake changes. Then, instead of processing in-process:

- a **dispatcher** thread claims ``received`` jobs from the journal (``journal.claim()``),
  publishes one Celery task per job with the spooled bytes (or, with
  ``executor.shared_storage``, a path to a copy there) on queue ``executor.queue``, and
  journals the task id (``journal.set_task``). The task id *is* the job id, so a job
  dispatched again (after a front-end crash between publish and journal, or when a task
  was lost) stays one logical task, and its outputs keep their deterministic UIDs;
- a **poller** thread reads the result backend for the journal's in-flight tasks
  (``journal.in_flight_tasks()``, so it survives restarts) and journals each outcome
  (``journal.record_remote_result``). A task that neither the backend nor the broker
  knows anything about for :attr:`BrokerOptions.lost_after` seconds is published again.

Workers send the outputs themselves; the front end's outbox has nothing to do for these
jobs (it still serves ``jobs retry`` of dead jobs whose outputs are on shared storage).

:func:`make_executor` picks this or the embedded :class:`~node.executor.local.LocalExecutor`.
"""

from __future__ import annotations

import base64
import logging
import shutil
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from node.config import Settings
from node.executor.celery_app import TASK_NAME, BrokerOptions, durable_write, make_app
from node.intake.journal import Job, Journal
from node.intake.spool import Spool
from node.outbox import backoff

log = logging.getLogger("dermnode.executor")

_KINDS = ("image", "seg", "pmap", "sr")


# -- wiring helpers for node/service.py ------------------------------------------------
def make_executor(settings: Settings, *, journal, spool, classifier_loader, identity, metrics, on_encoded):
    """The executor ``settings.executor.kind`` asks for. ``classifier_loader`` is called only
    for the embedded executor: a Celery front end never loads the model."""
    if settings.executor.kind == "local":
        from node.executor.local import LocalExecutor
        from node.pipeline.process import ProcessOptions

        return LocalExecutor(
            journal=journal,
            workers=settings.processing.workers,
            job_kwargs=dict(
                spool=spool,
                classifier=classifier_loader(),
                identity=identity,
                options=ProcessOptions(max_pixels=settings.limits.max_pixels),
                max_attempts=settings.retry.max_attempts,
                observe_stages=metrics.stages if metrics is not None else (lambda **seconds: None),
            ),
            on_encoded=on_encoded,
            **_local_runtime(settings),
        )
    return CeleryExecutor(settings, journal=journal, spool=spool, identity=identity, metrics=metrics,
                          on_encoded=on_encoded)


def _local_runtime(settings: Settings) -> dict:
    """The [processing] runtime options the embedded executor takes (pool, batching, threads)."""
    p = settings.processing
    names = ("pool_workers", "max_batch", "batch_wait_ms", "inference_threads")
    return {n: getattr(p, n) for n in names if hasattr(p, n)}


def recover(settings: Settings, journal: Journal) -> int:
    """At start: the recovery each executor needs (a Celery front end keeps dispatched jobs' tasks)."""
    if settings.executor.kind == "celery":
        return journal.recover_local_only(settings.retry.max_attempts)
    return journal.recover(settings.retry.max_attempts)


class RemoteModel:
    """What a Celery front end knows of the model: its card (for the journal's model key and
    the start-up log line), read without loading the weights. Quacks like a Classifier there."""

    def __init__(self, settings: Settings) -> None:
        from node.model.card import read_card

        self.card = read_card(settings.model.resolved_path())
        self.device = f"Celery workers (queue {settings.executor.queue})"


# -- the executor ------------------------------------------------------------------------
class CeleryExecutor:
    """Dispatcher + result poller. Interface of LocalExecutor: ``submit``, ``start``, ``stop``,
    ``n`` and ``_threads`` (for liveness: both threads alive)."""

    def __init__(
        self,
        settings: Settings,
        *,
        journal: Journal,
        spool: Spool,
        identity=None,
        metrics=None,
        on_encoded=lambda: None,
        app=None,
        poll_interval: float = 0.5,
        lost_after: float | None = None,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.spool = spool
        self.identity = identity
        self.metrics = metrics
        self.on_encoded = on_encoded
        self.app = app or make_app(settings, fail_fast=True)
        self.broker: BrokerOptions = self.app.dermnode_broker
        self.queue = settings.executor.queue
        self.shared = Path(settings.executor.shared_storage) if settings.executor.shared_storage else None
        self.poll_interval = poll_interval
        self.lost_after = self.broker.lost_after if lost_after is None else lost_after
        self.n = 2
        self._threads: list[threading.Thread] = []
        self._wake = threading.Condition()
        self._pending = 0
        self._poll_wake = threading.Event()
        self._stop = threading.Event()
        self._publish_lock = threading.Lock()
        self._unknown_since: dict[str, float] = {}
        self._retry_seen: dict[str, str] = {}
        self._broker_failures = 0
        self.busy = 0
        self.dispatched = 0
        self.redispatched = 0

    # LocalExecutor interface ----------------------------------------------------------
    def submit(self, job_id: str | None = None) -> None:
        """Called by intake after a job is journaled: wake the dispatcher."""
        with self._wake:
            self._pending += 1
            self._wake.notify()

    def start(self) -> None:
        for name, target in (("dermnode-dispatch", self._dispatch_loop), ("dermnode-results", self._poll_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "Celery executor: queue %s, broker %s, %s; redelivery of a lost worker's task after %.0f s",
            self.queue, self.broker.scheme,
            f"payload by path under {self.shared}" if self.shared else "payload by value",
            self.broker.visibility_timeout if self.broker.is_redis else 0,
        )

    def stop(self, timeout: float = 30) -> None:
        """Stop dispatching and polling; in-flight tasks go on in the workers and their
        outcomes are picked up at the next start (the task ids are journaled)."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        self._poll_wake.set()
        for t in self._threads:
            t.join(timeout)
        try:
            self.app.close()
        except Exception:  # noqa: BLE001
            pass

    def readiness(self) -> dict:
        """Broker reachable (for /readyz): the front end can still take images without it."""
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            return {"broker": "reachable", "broker_reachable": True}
        except Exception as exc:  # noqa: BLE001
            return {"broker": f"unreachable: {exc}", "broker_reachable": False}

    # dispatcher ---------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            if self._broker_failures:
                # broker down: probe it, and claim nothing until it answers (no churn of
                # claim / fail / retry through the journal during a long outage)
                self._stop.wait(min(30.0, 2.0 ** (self._broker_failures - 1)))
                if self._stop.is_set():
                    break
                if not self.readiness()["broker_reachable"]:
                    self._broker_failures += 1
                    continue
                log.info("broker reachable again: dispatching")
                self._broker_failures = 0
            try:
                did = self.dispatch_once()
            except Exception:  # noqa: BLE001 - the dispatcher must never die
                log.exception("dispatcher error")
                did = False
            if did:
                continue
            with self._wake:
                if self._pending == 0 and not self._stop.is_set():
                    self._wake.wait(timeout=1.0)
                self._pending = 0

    def dispatch_once(self) -> bool:
        """Claim one due job and publish its task; False when nothing is due."""
        job = self.journal.claim()
        if job is None:
            return False
        extra = {"job_id": job.id}
        self.busy += 1
        try:
            if job.task_id:  # dispatched before (an operator's requeue): drop the old outcome
                self.app.AsyncResult(job.task_id).forget()
            self._publish(job)
        except Exception as exc:  # noqa: BLE001 - broker down, shared storage full, input gone
            if not Path(job.input_path).exists():
                self.journal.mark_dead(job.id, f"spooled input missing: {job.input_path}")
                log.error("job %s dead-lettered: spooled input missing", job.id, extra=extra)
                return True
            delay = backoff(0, self.settings.retry.initial_delay, 30.0)
            self.journal.retry_processing(job.id, f"dispatch failed: {type(exc).__name__}: {exc}", delay)
            log.warning("job %s not dispatched, retry in %.0f s: %s", job.id, delay, exc, extra=extra)
            self._broker_failures += 1
            return False
        finally:
            self.busy -= 1
        self.journal.set_task(job.id, job.id)
        self._poll_wake.set()
        self.dispatched += 1
        log.info("job %s dispatched to queue %s", job.id, self.queue, extra=extra)
        return True

    def _payload(self, job: Job) -> dict:
        created = datetime.fromtimestamp(job.received_at, tz=timezone.utc).astimezone()
        payload = {
            "job_id": job.id,
            "sop_instance_uid": job.sop_instance_uid,
            "model": job.model,
            "received_at": job.received_at,
            # the same creation time and equipment as the embedded executor would use, fixed
            # here so that every worker (any time zone, any redelivery) makes identical objects
            "created": created.isoformat(),
            "identity": asdict(self.identity) if self.identity is not None else {},
            "dispatch": job.attempts,
        }
        if self.shared is not None:
            target = self.shared / "in" / f"{job.id}.dcm"
            if not target.exists():
                durable_write(target, Path(job.input_path).read_bytes())
            payload["path"] = str(target)
        else:
            payload["data"] = base64.b64encode(Path(job.input_path).read_bytes()).decode("ascii")
        return payload

    def _publish(self, job: Job) -> None:
        payload = self._payload(job)
        with self._publish_lock:
            self.app.send_task(
                TASK_NAME, args=[payload], task_id=job.id, queue=self.queue, routing_key=self.queue,
                retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                          "interval_max": 1.0},
            )

    # result poller ------------------------------------------------------------------
    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                n_in_flight = self.poll_once()
            except Exception as exc:  # noqa: BLE001 - e.g. backend down: try again later
                log.warning("cannot read task results (will retry): %s: %s", type(exc).__name__, exc,
                            exc_info=log.isEnabledFor(logging.DEBUG))
                n_in_flight = 0
                self._stop.wait(5.0)
            self._poll_wake.wait(self.poll_interval if n_in_flight else 2.0)
            self._poll_wake.clear()

    def _metas(self, task_ids: list[str]) -> dict[str, dict]:
        backend = self.app.backend
        try:  # key-value backends (Redis): one round trip for all
            keys = [backend.get_key_for_task(t) for t in task_ids]
            values = backend.mget(keys)
            out = {}
            for t, v in zip(task_ids, values):
                try:
                    out[t] = backend.decode_result(v) if v else {"status": "PENDING", "result": None}
                except Exception as exc:  # noqa: BLE001 - one bad entry must not stall the others
                    out[t] = {"status": "FAILURE", "result": f"undecodable task result: {exc}"}
            return out
        except NotImplementedError:
            pass
        return {t: {"status": (r := self.app.AsyncResult(t)).state, "result": r.result} for t in task_ids}

    def poll_once(self) -> int:
        """Journal the outcome of every finished task; returns how many are still in flight."""
        jobs = self.journal.in_flight_tasks()
        if not jobs:
            self._unknown_since.clear()
            self._retry_seen.clear()
            return 0
        still = 0
        for i in range(0, len(jobs), 500):
            chunk = jobs[i:i + 500]
            metas = self._metas([j.task_id for j in chunk])
            for job in chunk:
                meta = metas[job.task_id]
                status = meta.get("status")
                if status == "SUCCESS":
                    self._record(job, meta.get("result"))
                elif status == "FAILURE":
                    self._failed(job, meta.get("result"))
                else:
                    still += 1
                    if status == "RETRY":
                        self._retrying(job, meta.get("result"))
                    self._maybe_lost(job, status)
        return still

    def _record(self, job: Job, result) -> None:
        extra = {"job_id": job.id}
        try:
            state = result["state"]
            worker = str(result.get("worker", ""))
            outputs = [
                (str(k), str(c), str(u), str(p), None if s is None else int(s)) for k, c, u, p, s in result["outputs"]
            ]
            if state not in ("done", "dead") or (state == "done" and sorted(o[0] for o in outputs) != sorted(_KINDS)):
                raise ValueError(f"unexpected result {result!r}")
        except (KeyError, TypeError, ValueError) as exc:
            self._failed(job, f"malformed task result: {exc}")
            return
        error = str(result.get("error", ""))
        self.journal.record_remote_result(job.id, worker=worker, outputs=outputs, state=state, error=error)
        self._unknown_since.pop(job.id, None)
        self._retry_seen.pop(job.id, None)
        self._observe(job, state, outputs, result.get("times") or {})
        if state == "done":
            log.info("job %s done by %s: 4 objects delivered to %s", job.id, worker,
                     self.settings.destination.ae_title, extra=extra)
            self._cleanup(job, keep_outputs=False)
        else:
            log.error("job %s dead-lettered by %s: %s", job.id, worker, error, extra=extra)
            self._cleanup(job, keep_outputs=True)
        try:
            self.app.AsyncResult(job.task_id).forget()
        except Exception:  # noqa: BLE001 - it expires anyway
            pass

    def _failed(self, job: Job, exc) -> None:
        """The task itself failed (not a result of ours): run it again, up to max_attempts."""
        reason = f"task failed: {exc!r}" if not isinstance(exc, str) else exc
        if job.attempts >= self.settings.retry.max_attempts:
            self.journal.record_remote_result(job.id, worker="", outputs=[], state="dead",
                                              error=f"failed {job.attempts} times, last: {reason}")
            log.error("job %s dead-lettered: %s", job.id, reason, extra={"job_id": job.id})
        else:
            self.journal.record_remote_result(job.id, worker="", outputs=[], state="received", error=reason)
            log.warning("job %s: %s; dispatching again", job.id, reason, extra={"job_id": job.id})
            self.submit()
        self._unknown_since.pop(job.id, None)
        self._retry_seen.pop(job.id, None)
        try:
            self.app.AsyncResult(job.task_id).forget()
        except Exception:  # noqa: BLE001
            pass

    def _retrying(self, job: Job, exc) -> None:
        """A worker retries the task (send failed transiently, or a processing error): say so once."""
        reason = str(exc)
        if self._retry_seen.get(job.id) == reason:
            return
        self._retry_seen[job.id] = reason
        log.warning("job %s: %s", job.id, reason, extra={"job_id": job.id})
        if self.metrics is not None:
            self.metrics.outbox_event("retry")

    def _maybe_lost(self, job: Job, status: str | None) -> None:
        """PENDING (or STARTED) for longer than lost_after with no trace in the broker: publish again."""
        if status not in ("PENDING", "STARTED"):
            self._unknown_since.pop(job.id, None)  # RETRY: a worker holds it
            return
        now = time.time()
        since = self._unknown_since.setdefault(job.id, now)  # a restarted front end waits the full time again
        if now - since < self.lost_after:
            return
        self._unknown_since[job.id] = now
        if self._broker_has_trace(job.task_id):
            return
        extra = {"job_id": job.id}
        try:
            self._publish(job)
        except Exception as exc:  # noqa: BLE001
            log.warning("job %s: task lost, and publishing again failed: %s", job.id, exc, extra=extra)
            return
        self.journal.set_task(job.id, job.task_id)
        self.redispatched += 1
        log.warning("job %s: task %s unknown to broker and backend for %.0f s (%s): dispatched again",
                    job.id, job.task_id, self.lost_after, status, extra=extra)

    def _broker_has_trace(self, task_id: str) -> bool:
        """True when the message may still be in the broker (queue not empty, or held unacked)."""
        try:
            if self.broker.is_redis:
                import redis

                client = redis.Redis.from_url(self.broker.url, socket_timeout=5, socket_connect_timeout=5)
                try:
                    if client.llen(self.queue) > 0:
                        return True
                    needle = task_id.encode()
                    for _, value in client.hscan_iter("unacked", count=100):
                        if needle in value:
                            return True
                    return False
                finally:
                    client.close()
            from node.executor.celery_app import queue_depths

            return queue_depths(self.settings, (self.queue,))[self.queue] > 0
        except Exception:  # noqa: BLE001 - cannot tell: assume it is there
            return True

    def _observe(self, job: Job, state: str, outputs: list, times: dict) -> None:
        m = self.metrics
        if m is None:
            return
        try:
            stages = {k: float(times[k]) for k in ("prepare", "infer", "encode") if k in times}
            if stages:
                m.stages(**stages)
            for kind, _, _, _, status in outputs:
                if status is not None:
                    m.outbox_event("sent", kind=kind)
            if state == "done":
                m.outbox_event("done", latency=time.time() - job.received_at, send_seconds=float(times.get("send", 0)))
            else:
                m.dead.labels("remote").inc()
        except Exception:  # noqa: BLE001 - metrics never break the poller
            log.debug("metrics update failed", exc_info=True)

    def _cleanup(self, job: Job, *, keep_outputs: bool) -> None:
        if self.shared is not None:
            (self.shared / "in" / f"{job.id}.dcm").unlink(missing_ok=True)
            if not keep_outputs:
                shutil.rmtree(self.shared / "out" / job.id, ignore_errors=True)
        if not keep_outputs and self.settings.storage.retention_hours <= 0:
            self.spool.remove_job(job.id)
