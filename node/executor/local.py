"""The embedded executor: worker threads in this process, fed by the journal.

Workers claim ``received`` jobs from the journal (so a restart resumes them),
run :func:`node.executor.job.run_job`, and wake the outbox. The C-STORE
handler only wakes them; it never runs inference on the association thread.
"""

from __future__ import annotations

import logging
import threading

from node.executor.job import run_job

log = logging.getLogger("dermnode.executor")


class LocalExecutor:
    def __init__(self, *, journal, workers: int, job_kwargs: dict, on_encoded=lambda: None) -> None:
        self.journal = journal
        self.n = workers
        self.job_kwargs = job_kwargs
        self.on_encoded = on_encoded
        self._wake = threading.Condition()
        self._pending = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.busy = 0

    def submit(self, job_id: str | None = None) -> None:
        """Called by intake after a job is journaled: wake a worker."""
        with self._wake:
            self._pending += 1
            self._wake.notify()

    def start(self) -> None:
        for i in range(self.n):
            t = threading.Thread(target=self._run, name=f"dermnode-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 60) -> None:
        """Finish the jobs in hand, then stop; unclaimed jobs stay in the journal."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self.journal.claim()
            if job is None:
                with self._wake:
                    if self._pending == 0 and not self._stop.is_set():
                        self._wake.wait(timeout=1.0)
                    self._pending = 0
                continue
            self.busy += 1
            try:
                state = run_job(job, journal=self.journal, **self.job_kwargs)
            except Exception:  # noqa: BLE001 - run_job handles errors; this is a last guard
                log.exception("worker error on job %s", job.id, extra={"job_id": job.id})
                state = "received"
            finally:
                self.busy -= 1
            if state == "encoded":
                self.on_encoded()
