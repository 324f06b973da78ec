"""Intake: decide what to do with one received dataset, and keep it durably.

This is the whole of the C-STORE critical path. It knows nothing about the
network: the SCP handler passes the raw bytes and the parsed header, and gets
back a DIMSE status. Success (0x0000) is returned only after the bytes are
fsync'd in the spool and the job row is committed in the journal.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from pydicom import Dataset

from node.evidence.identity import NodeIdentity
from node.intake.journal import Journal
from node.intake.spool import Spool
from node.network.sopclasses import OUTPUT_ONLY_CLASSES

log = logging.getLogger("dermnode.intake")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass
class IntakeStats:
    """Counters read by the metrics endpoint and the tests."""

    received: int = 0
    accepted: int = 0
    ignored_own: int = 0
    duplicates: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, name: str, status: int | None = None) -> None:
        with self.lock:
            if status is not None:
                self.refused[status] = self.refused.get(status, 0) + 1
            else:
                setattr(self, name, getattr(self, name) + 1)


@dataclass(frozen=True)
class Decision:
    status: int
    reason: str = ""
    job_id: str | None = None


def is_own_output(ds: Dataset, identity: NodeIdentity) -> bool:
    """True for objects this node (or another instance of it) made."""
    if str(ds.get("SOPClassUID", "")) in OUTPUT_ONLY_CLASSES:
        return True
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    derived = bool(image_type) and image_type[0] == "DERIVED"
    ours = str(ds.get("Manufacturer", "")) == identity.manufacturer and str(
        ds.get("ManufacturerModelName", "")
    ) == identity.model_name
    return derived and ours


class Intake:
    def __init__(
        self,
        *,
        spool: Spool,
        journal: Journal,
        identity: NodeIdentity,
        model_key: str,
        accepted_classes: list[str],
        min_free_bytes: int,
        max_queue: int,
        header_check: Callable[[Dataset], None],
        resend_duplicates: bool = False,
        on_job: Callable[[str], None] = lambda job_id: None,
        observe: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.spool = spool
        self.journal = journal
        self.identity = identity
        self.model_key = model_key
        self.accepted_classes = set(accepted_classes)
        self.min_free_bytes = min_free_bytes
        self.max_queue = max_queue
        self.header_check = header_check
        self.resend_duplicates = resend_duplicates
        self.on_job = on_job
        self.observe = observe
        self.stats = IntakeStats()
        # One writer at a time keeps the free-space and queue checks honest.
        self._lock = threading.Lock()

    def accept(self, raw: bytes, ds: Dataset, context_class: str, calling_ae: str) -> Decision:
        """Return the DIMSE status for one C-STORE request, storing the job on success."""
        self.stats.bump("received")
        decision = self._decide(raw, ds, context_class, calling_ae)
        if decision.status == SUCCESS and decision.job_id:
            self.stats.bump("accepted")
            self.observe("accepted")
            self.on_job(decision.job_id)
        elif decision.status != SUCCESS:
            self.stats.bump("refused", decision.status)
            self.observe(f"refused_0x{decision.status:04X}")
        else:
            self.observe(decision.reason.replace(" ", "_"))
        return decision

    def _decide(self, raw: bytes, ds: Dataset, context_class: str, calling_ae: str) -> Decision:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        if not sop_class:
            return self._refuse(CANNOT_UNDERSTAND, "SOPClassUID missing", sop_uid)
        if sop_class != context_class:
            return self._refuse(
                DATASET_MISMATCH,
                f"SOPClassUID {sop_class} does not match the presentation context {context_class}",
                sop_uid,
            )
        if is_own_output(ds, self.identity):
            self.stats.bump("ignored_own")
            log.debug("ignored own output %s (%s)", sop_uid, sop_class)
            return Decision(SUCCESS, "own output ignored")
        if sop_class not in self.accepted_classes:
            return self._refuse(DATASET_MISMATCH, f"SOP class {sop_class} is not processed", sop_uid)
        if not sop_uid:
            return self._refuse(CANNOT_UNDERSTAND, "SOPInstanceUID missing", sop_uid)
        if not study_uid:
            return self._refuse(CANNOT_UNDERSTAND, "StudyInstanceUID missing", sop_uid)
        try:
            self.header_check(ds)
        except ValueError as exc:
            return self._refuse(CANNOT_UNDERSTAND, f"image refused: {exc}", sop_uid)

        with self._lock:
            previous = self.journal.find_processed(sop_uid, self.model_key)
            if previous is not None and not self.resend_duplicates:
                self.stats.bump("duplicates")
                log.info(
                    "duplicate of %s (job %s, %s): acknowledged, not reprocessed",
                    sop_uid, previous.id, previous.state,
                )
                return Decision(SUCCESS, "duplicate", None)
            free = self.spool.free_bytes()
            if free - len(raw) < self.min_free_bytes:
                return self._refuse(
                    OUT_OF_RESOURCES,
                    f"free disk space {free // 2**20} MiB is below the watermark {self.min_free_bytes // 2**20} MiB",
                    sop_uid,
                )
            depth = self.journal.queue_depth()
            if depth >= self.max_queue:
                return self._refuse(
                    OUT_OF_RESOURCES, f"queue holds {depth} jobs, at the limit {self.max_queue}", sop_uid
                )
            job_id = self.journal.new_id()
            try:
                path = self.spool.store_input(job_id, raw)
                self.journal.add_job(
                    job_id=job_id,
                    sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class,
                    study_uid=study_uid,
                    calling_ae=calling_ae,
                    input_path=str(path),
                    model=self.model_key,
                )
            except Exception as exc:  # disk full, I/O error, locked DB: never acknowledge
                self.spool.input_path(job_id).unlink(missing_ok=True)
                return self._refuse(OUT_OF_RESOURCES, f"could not store durably: {exc}", sop_uid)
        log.info("job %s received %s from %s", job_id, sop_uid, calling_ae, extra={"job_id": job_id})
        return Decision(SUCCESS, "stored", job_id)

    def _refuse(self, status: int, reason: str, sop_uid: str) -> Decision:
        log.warning("refused %s with 0x%04X: %s", sop_uid or "(no SOPInstanceUID)", status, reason)
        return Decision(status, reason)
