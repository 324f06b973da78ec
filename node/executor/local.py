"""The embedded executor: worker threads in this process, fed by the journal.

Workers claim ``received`` jobs from the journal (so a restart resumes them),
run :func:`node.executor.job.run_job`, and wake the outbox. The C-STORE
handler only wakes them; it never runs inference on the association thread.

Wake-ups are pushed, never polled: :meth:`LocalExecutor.submit` (called by
intake after the journal commit) notifies a waiting worker, and a worker that
finishes a job calls ``on_encoded`` (the outbox's Event). The one-second wait
of an idle worker only matters for jobs whose retry time is in the future.

Processing runtime (``[processing]`` in the configuration):

* ``pool_workers`` > 0: prepare and encode run in that many worker processes
  (:mod:`node.executor.pool`), so decoding and encoding use other cores while
  this process runs the model;
* ``max_batch`` > 1 (by default on a CUDA device): the model call is
  micro-batched across the worker threads (:mod:`node.executor.batching`),
  waiting at most ``batch_wait_ms`` for a batch to fill;
* ``inference_threads``: torch's intra-op threads; 0 picks half the cores the
  other stages leave free (1 to 4): more threads than free cores make a CPU
  forward pass many times slower, not faster.
"""

from __future__ import annotations

import logging
import os
import threading

from node.executor.batching import MicroBatcher
from node.executor.job import run_job
from node.executor.pool import Stages

log = logging.getLogger("dermnode.executor")

#: Batch size used on a CUDA device when ``max_batch`` is 0 (auto).
CUDA_AUTO_BATCH = 16
#: Most torch threads chosen automatically: one 224 x 224 forward pass of a small CNN
#: gains little past this, and a node has other work for the remaining cores.
AUTO_THREADS_MAX = 4


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_inference_threads(workers: int, pool_workers: int, cores: int | None = None) -> int:
    """Torch threads for the model: half the cores the other stages leave free, 1 to 4.

    Pool processes take one core each; without a pool, the other worker threads
    run prepare/encode (one core between them: they share the GIL). Half, because
    the node's network threads and other tenants need CPU too, and a forward pass
    with more threads than free cores is not a little slower but many times slower
    (measured on 2 shared cores: 25 ms with 2 threads idle, 200-2,000 ms with 2
    threads beside a busy neighbour, 30-60 ms with 1 thread in both cases).
    """
    cores = cores or available_cores()
    others = pool_workers if pool_workers > 0 else (1 if workers > 1 else 0)
    return max(1, min(AUTO_THREADS_MAX, (cores - others) // 2))


def auto_max_batch(device_type: str, max_batch: int) -> int:
    if max_batch > 0:
        return max_batch
    return CUDA_AUTO_BATCH if device_type == "cuda" else 1


class LocalExecutor:
    def __init__(
        self,
        *,
        journal,
        workers: int,
        job_kwargs: dict,
        on_encoded=lambda: None,
        pool_workers: int = 0,
        max_batch: int = 0,
        batch_wait_ms: float = 5.0,
        inference_threads: int = 0,
    ) -> None:
        self.journal = journal
        self.n = workers
        self.job_kwargs = job_kwargs
        self.on_encoded = on_encoded
        self.pool_workers = pool_workers
        self.max_batch = max_batch
        self.batch_wait_ms = batch_wait_ms
        self.inference_threads = inference_threads
        self._wake = threading.Condition()
        self._pending = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.busy = 0
        self.stages: Stages | None = None
        self.batcher: MicroBatcher | None = None

    def submit(self, job_id: str | None = None) -> None:
        """Called by intake after a job is journaled: wake a worker."""
        with self._wake:
            self._pending += 1
            self._wake.notify()

    def _setup_runtime(self) -> None:
        kw = self.job_kwargs
        classifier = kw["classifier"]
        device_type = getattr(getattr(classifier, "device", None), "type", "cpu")
        if device_type == "cpu":
            threads = self.inference_threads or auto_inference_threads(self.n, self.pool_workers)
            import torch

            torch.set_num_threads(threads)
        else:
            threads = 0
        self.stages = Stages(classifier.card, kw["options"], kw["identity"], self.pool_workers)
        batch = auto_max_batch(device_type, self.max_batch)
        if batch > 1:
            self.batcher = MicroBatcher(classifier, max_batch=batch, max_wait=self.batch_wait_ms / 1000).start()
        log.info(
            "executor: %d worker thread(s), %s, model on %s%s%s",
            self.n,
            f"prepare/encode in {self.pool_workers} process(es)" if self.pool_workers else "prepare/encode in-thread",
            device_type,
            f" with {threads} thread(s)" if threads else "",
            f", micro-batches of up to {batch} (wait {self.batch_wait_ms:g} ms)" if batch > 1 else "",
        )

    def start(self) -> None:
        self._setup_runtime()
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
        if self.batcher is not None:
            self.batcher.stop()
        if self.stages is not None:
            self.stages.close()

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
                state = run_job(job, journal=self.journal, stages=self.stages, batcher=self.batcher, **self.job_kwargs)
            except Exception:  # noqa: BLE001 - run_job handles errors; this is a last guard
                log.exception("worker error on job %s", job.id, extra={"job_id": job.id})
                state = "received"
            finally:
                self.busy -= 1
            if state == "encoded":
                self.on_encoded()
