"""One job, from spooled input to encoded outputs in the spool: prepare -> classify -> encode -> store.

Used by every executor. Prepare (decode, frame, segment) and encode (build the
four objects, serialise) run in this thread or in a process pool
(:class:`node.executor.pool.Stages`); the model call runs here, alone or
micro-batched with other jobs' images (:class:`node.executor.batching.MicroBatcher`). Bad input (a dataset that cannot be decoded or is not
a usable image) is a property of the data, so it is dead-lettered at once with
the reason; any other error is retried up to ``max_attempts`` times.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pydicom
from pydicom import Dataset

from node.evidence import encode as _encode
from node.evidence.build import build_evidence
from node.evidence.identity import NodeIdentity
from node.executor.pool import KINDS, Stages
from node.intake.journal import Job, Journal
from node.intake.spool import Spool
from node.pipeline.decode import DecodeError
from node.pipeline.process import ProcessOptions, assemble, classify, finish, prepare

if TYPE_CHECKING:
    from node.executor.batching import MicroBatcher
    from node.model.classifier import Classifier

log = logging.getLogger("dermnode.job")

__all__ = ["KINDS", "StageTimes", "derive", "encode", "run_job"]


@dataclass
class StageTimes:
    prepare: float = 0.0
    infer: float = 0.0
    encode: float = 0.0


def encode(ds: Dataset) -> bytes:
    """The DICOM file bytes of a derived object (as ``pydicom.dcmwrite``, faster)."""
    return _encode.encode(ds)


def derive(
    source: Dataset,
    classifier: Classifier,
    identity: NodeIdentity,
    options: ProcessOptions,
    created: datetime,
    times: StageTimes | None = None,
):
    """The pure path for one dataset: Evidence and the 4 derived datasets."""
    t0 = time.perf_counter()
    prepared = prepare(source, classifier, options)
    t1 = time.perf_counter()
    evidence = finish([prepared], classifier)[0]
    t2 = time.perf_counter()
    derived = build_evidence(source, evidence, identity, created)
    t3 = time.perf_counter()
    if times is not None:
        times.prepare, times.infer, times.encode = t1 - t0, t2 - t1, t3 - t2
    return evidence, derived


def run_job(
    job: Job,
    *,
    journal: Journal,
    spool: Spool,
    classifier: Classifier,
    identity: NodeIdentity,
    options: ProcessOptions,
    max_attempts: int,
    retry_delay: float = 5.0,
    observe_stages=lambda **seconds: None,
    stages: Stages | None = None,
    batcher: MicroBatcher | None = None,
) -> str:
    """Process one claimed job; returns the job's new state."""
    extra = {"job_id": job.id}
    stages = stages or Stages(classifier.card, options, identity)
    try:
        created = datetime.fromtimestamp(job.received_at, tz=timezone.utc).astimezone()
        t0 = time.perf_counter()
        # In-thread stages share one read of the input; pool workers read it themselves.
        source = pydicom.dcmread(job.input_path) if stages.pool_workers == 0 else None
        prepared = stages.prepare(job.input_path, source)
        t1 = time.perf_counter()
        if batcher is not None:
            probs, cam = batcher.classify(prepared)
        else:
            batch_probs, batch_cams = classify([prepared], classifier)
            probs, cam = batch_probs[0], batch_cams[0]
        evidence = assemble(prepared, probs, cam, classifier.card)
        t2 = time.perf_counter()
        encoded = stages.encode(job.input_path, evidence, created, source)
        t3 = time.perf_counter()
        outputs = [
            (e.kind, e.sop_class_uid, e.sop_instance_uid, str(spool.store_output(job.id, e.kind, e.data)))
            for e in encoded
        ]
        journal.mark_encoded(job.id, outputs)
        t4 = time.perf_counter()
        observe_stages(prepare=t1 - t0, infer=t2 - t1, encode=t3 - t2, store=t4 - t3)
        top = evidence.top_class
        log.info(
            "job %s encoded: top class %s p=%.3f, segmentation %s; prepare %.0f ms, infer %.0f ms, "
            "encode %.0f ms, store %.0f ms",
            job.id, top.code, float(evidence.probabilities[evidence.top_index]),
            "ok" if evidence.segmentation.ok else f"failed ({evidence.segmentation.failure})",
            (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3,
            extra=extra,
        )
        return "encoded"
    except (DecodeError, pydicom.errors.InvalidDicomError, ValueError, KeyError, AttributeError) as exc:
        # The input itself is unusable; retrying cannot help.
        reason = f"bad input: {type(exc).__name__}: {exc}"
        journal.mark_dead(job.id, reason)
        log.warning("job %s dead-lettered: %s", job.id, reason, extra=extra)
        return "dead"
    except Exception as exc:  # noqa: BLE001 - anything else may be transient (OOM, CUDA, I/O)
        reason = f"{type(exc).__name__}: {exc}"
        if job.attempts >= max_attempts:
            journal.mark_dead(job.id, f"failed {job.attempts} times, last: {reason}")
            log.error("job %s dead-lettered after %d attempts: %s", job.id, job.attempts, reason, extra=extra)
            return "dead"
        journal.retry_processing(job.id, reason, retry_delay * job.attempts)
        log.warning("job %s failed (attempt %d), will retry: %s", job.id, job.attempts, reason, extra=extra)
        return "received"
