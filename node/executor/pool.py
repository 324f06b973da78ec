"""The CPU stages of a job, in the worker thread or in a pool of worker processes.

Two stages surround the model call: *prepare* (read the spooled file, decode,
frame, segment) and *encode* (build the four derived objects and serialise
them). :class:`Stages` runs them in the calling thread, or, with
``pool_workers`` > 0, in a :class:`concurrent.futures.ProcessPoolExecutor` of
spawned processes that never import torch, so that several cores work on
decoding and encoding while the model (CPU threads or a GPU) classifies.

The functions are the same in both places; the pool only moves them. Workers
return bytes: the spool (and the journal) keep one writer, the executor.
A worker that dies (a decoder crash) breaks the pool; it is replaced and the
job fails with a transient error, so it is retried and, if it keeps killing
workers, dead-lettered. Workers end with the node, even when it is killed.

Workers are *spawned* (the node has threads and torch loaded: forking it is
unsafe), so, as always with spawn, a program that creates a pool from a script
must guard its entry point with ``if __name__ == "__main__":``; the ``dermnode``
commands do.
"""

from __future__ import annotations

import datetime as _dt
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import pydicom
from pydicom import Dataset

from node.evidence.build import build_evidence
from node.evidence.encode import encode
from node.evidence.identity import NodeIdentity
from node.model.card import ModelCard
from node.pipeline.process import Prepared, ProcessOptions, prepare
from node.pipeline.result import Evidence

log = logging.getLogger("dermnode.pool")

KINDS = ("image", "seg", "pmap", "sr")


@dataclass(frozen=True)
class Encoded:
    """One derived object, serialised: (kind, SOP Class UID, SOP Instance UID, file bytes)."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    data: bytes


def prepare_file(path: str, card: ModelCard, options: ProcessOptions, times: dict | None = None) -> Prepared:
    """Read a spooled input and prepare it for the model."""
    return prepare(pydicom.dcmread(path), card, options, times)


def encode_evidence(
    source: Dataset | str, evidence: Evidence, identity: NodeIdentity, created: _dt.datetime,
    times: dict | None = None,
) -> list[Encoded]:
    """Build the four derived objects of ``source`` (a dataset or a spooled file) and serialise them."""
    if not isinstance(source, Dataset):
        source = pydicom.dcmread(source)
    t0 = time.perf_counter()
    derived = build_evidence(source, evidence, identity, created)
    t1 = time.perf_counter()
    out = [Encoded(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), encode(ds)) for kind, ds in zip(KINDS, derived)]
    if times is not None:
        times.update(build=t1 - t0, serialise=time.perf_counter() - t1)
    return out


# --- worker processes --------------------------------------------------------------------

_WORKER: dict = {}


def _die_with_parent(parent: int) -> None:
    """End this worker when the node ends, even by SIGKILL (the pool's pipes would not tell it)."""
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="dermnode-pool-watch", daemon=True).start()


def _init_worker(card: ModelCard, options: ProcessOptions, identity: NodeIdentity, parent: int) -> None:
    _die_with_parent(parent)
    _WORKER.update(card=card, options=options, identity=identity)


def _ping() -> int:
    return os.getpid()


def _prepare_in_worker(path: str) -> tuple[Prepared, dict]:
    times: dict = {}
    return prepare_file(path, _WORKER["card"], _WORKER["options"], times), times


def _encode_in_worker(path: str, evidence: Evidence, created: _dt.datetime) -> tuple[list[Encoded], dict]:
    times: dict = {}
    return encode_evidence(path, evidence, _WORKER["identity"], created, times), times


class Stages:
    """Prepare and encode, in this thread (``pool_workers`` 0) or in worker processes."""

    def __init__(self, card: ModelCard, options: ProcessOptions, identity: NodeIdentity, pool_workers: int = 0) -> None:
        self.card = card
        self.options = options
        self.identity = identity
        self.pool_workers = pool_workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        if pool_workers > 0:
            self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(
            max_workers=self.pool_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.card, self.options, self.identity, os.getpid()),
        )
        # Start every worker now (imports take seconds), not on the first job.
        for f in [pool.submit(_ping) for _ in range(self.pool_workers)]:
            f.result()
        return pool

    def worker_pids(self) -> list[int]:
        pool = self._pool
        return sorted(getattr(pool, "_processes", {}) or {}) if pool is not None else []

    def _run(self, fn, *args):
        pool = self._pool
        assert pool is not None
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as exc:
            with self._lock:
                if self._pool is pool:
                    log.error("a pool worker died; starting a new pool")
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
            raise RuntimeError(f"worker process died: {exc}") from exc

    def prepare(self, path: str, source: Dataset | None = None, times: dict | None = None) -> Prepared:
        if self._pool is None:
            src = source if source is not None else pydicom.dcmread(path)
            return prepare(src, self.card, self.options, times)
        prepared, t = self._run(_prepare_in_worker, path)
        if times is not None:
            times.update(t)
        return prepared

    def encode(self, path: str, evidence: Evidence, created: _dt.datetime, source: Dataset | None = None,
               times: dict | None = None) -> list[Encoded]:
        if self._pool is None:
            return encode_evidence(source if source is not None else path, evidence, self.identity, created, times)
        encoded, t = self._run(_encode_in_worker, path, evidence, created)
        if times is not None:
            times.update(t)
        return encoded

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
