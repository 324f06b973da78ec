"""The outbox: sends encoded outputs from the spool, as the journal says, with retries.

For each job in state ``encoded`` whose retry time has come, it sends the
outputs not yet sent (in order: image, seg, pmap, sr), over one reused
association, recording each response status in the journal. A transient
failure schedules a retry with exponential backoff and jitter (persisted in
the journal); a permanent one, or a job older than the retry horizon,
dead-letters the job with its reason.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from node.intake.journal import Journal
from node.intake.spool import Spool
from node.network.scu import Destination, Sender, SendError

log = logging.getLogger("dermnode.outbox")


def backoff(attempt: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (0-based): initial * 2**attempt, capped, with
    +-20 % jitter so that a fleet of nodes does not retry in lock-step."""
    base = min(maximum, initial * (2 ** min(attempt, 40)))
    r = (rng or random).uniform(0.8, 1.2)
    return min(maximum, base * r)


class Outbox:
    def __init__(
        self,
        *,
        journal: Journal,
        spool: Spool,
        destination: Destination,
        sop_classes: list[str],
        initial_delay: float,
        max_delay: float,
        max_age: float,
        retention: float,
        on_event=lambda name, **kw: None,
    ) -> None:
        self.journal = journal
        self.spool = spool
        self.destination = destination
        self.sender = Sender(destination, sop_classes)
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.max_age = max_age
        self.retention = retention
        self.on_event = on_event
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_purge = 0.0

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dermnode-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        self.sender.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                did = self.drain()
                self._purge()
            except Exception:  # noqa: BLE001 - the outbox must never die
                log.exception("outbox loop error")
                did = 0
            if did:
                continue
            self.sender.close()  # idle: do not hold the destination's association open
            nxt = self.journal.next_due_at()
            wait = 5.0 if nxt is None else max(0.05, min(5.0, nxt - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def drain(self) -> int:
        """Send everything that is due now; returns the number of jobs handled."""
        jobs = self.journal.due_for_send()
        for job in jobs:
            if self._stop.is_set():
                break
            self.send_job(job)
        return len(jobs)

    def send_job(self, job) -> str:
        extra = {"job_id": job.id}
        if time.time() - job.received_at > self.max_age:
            self.journal.mark_dead(job.id, f"not delivered within {self.max_age / 3600:.1f} h: {job.last_error}")
            self.on_event("dead")
            log.error("job %s dead-lettered: retry horizon passed (%s)", job.id, job.last_error, extra=extra)
            return "dead"
        t0 = time.perf_counter()
        try:
            for out in self.journal.outputs(job.id):
                if out.state == "sent":
                    continue
                status = self.sender.send_file(out.path, out.sop_class_uid)
                self.journal.mark_sent(job.id, out.kind, status)
                self.on_event("sent", kind=out.kind)
        except SendError as exc:
            if exc.transient:
                delay = backoff(job.send_attempts, self.initial_delay, self.max_delay)
                self.journal.schedule_send_retry(job.id, str(exc), delay)
                self.on_event("retry")
                log.warning("job %s send failed (transient), retry in %.0f s: %s", job.id, delay, exc, extra=extra)
                return "encoded"
            self.journal.mark_dead(job.id, f"permanent send failure: {exc}")
            self.on_event("dead")
            log.error("job %s dead-lettered: permanent send failure: %s", job.id, exc, extra=extra)
            return "dead"
        self.journal.mark_done(job.id)
        self.on_event("done", latency=time.time() - job.received_at, send_seconds=time.perf_counter() - t0)
        log.info("job %s done: 4 objects delivered to %s", job.id, self.destination.ae_title, extra=extra)
        if self.retention <= 0:
            self.spool.remove_job(job.id)
        return "done"

    def _purge(self) -> None:
        """Remove spool files of delivered jobs after the retention time (dead jobs keep theirs)."""
        now = time.time()
        if now - self._last_purge < 60 or self.retention <= 0:
            return
        self._last_purge = now
        for job in self.journal.list_jobs("done", limit=10000):
            if now - job.updated_at > self.retention:
                self.spool.remove_job(job.id)
