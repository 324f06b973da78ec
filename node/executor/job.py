"""One job, from spooled input to encoded outputs in the spool: read -> process -> build -> write.

Used by every executor. Bad input (a dataset that cannot be decoded or is not
a usable image) is a property of the data, so it is dead-lettered at once with
the reason; any other error is retried up to ``max_attempts`` times.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pydicom
from pydicom import Dataset

from node.evidence.build import build_evidence
from node.evidence.identity import NodeIdentity
from node.intake.journal import Job, Journal
from node.intake.spool import Spool
from node.model.classifier import Classifier
from node.pipeline.decode import DecodeError
from node.pipeline.process import ProcessOptions, finish, prepare

log = logging.getLogger("dermnode.job")

KINDS = ("image", "seg", "pmap", "sr")


@dataclass
class StageTimes:
    prepare: float = 0.0
    infer: float = 0.0
    encode: float = 0.0


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


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
) -> str:
    """Process one claimed job; returns the job's new state."""
    extra = {"job_id": job.id}
    try:
        source = pydicom.dcmread(job.input_path)
        created = datetime.fromtimestamp(job.received_at, tz=timezone.utc).astimezone()
        times = StageTimes()
        evidence, derived = derive(source, classifier, identity, options, created, times)
        outputs = []
        for kind, ds in zip(KINDS, derived):
            path = spool.store_output(job.id, kind, encode(ds))
            outputs.append((kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(path)))
        journal.mark_encoded(job.id, outputs)
        observe_stages(prepare=times.prepare, infer=times.infer, encode=times.encode)
        top = evidence.top_class
        log.info(
            "job %s encoded: top class %s p=%.3f, segmentation %s; prepare %.0f ms, infer %.0f ms, encode %.0f ms",
            job.id, top.code, float(evidence.probabilities[evidence.top_index]),
            "ok" if evidence.segmentation.ok else f"failed ({evidence.segmentation.failure})",
            times.prepare * 1e3, times.infer * 1e3, times.encode * 1e3,
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
