"""The job journal: an SQLite state machine, one transaction per transition.

States::

    received ──claim──▶ processing ──encoded──▶ encoded ──(all outputs sent)──▶ done
        ▲                  │  │                    │
        └──(crash/retry)───┘  └──(bad input)──▶ dead ◀──(permanent / expired)──┘

    encoded jobs whose send failed transiently stay ``encoded`` with a
    ``next_attempt_at`` in the future (the persisted retry schedule).

The journal is the only shared state between intake, the executor and the
outbox. WAL mode with ``synchronous=FULL``: a committed row survives power loss.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

STATES = ("received", "processing", "encoded", "done", "dead")
ACTIVE = ("received", "processing", "encoded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    input_path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    task_id TEXT NOT NULL DEFAULT '',   -- distributed executor: the task processing this job
    worker TEXT NOT NULL DEFAULT ''     -- distributed executor: the worker that finished it
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_sop ON jobs(sop_instance_uid, model);
CREATE TABLE IF NOT EXISTS outputs (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,            -- encoded | sent
    status INTEGER,                 -- last DIMSE status from the destination
    sent_at REAL,
    PRIMARY KEY (job_id, kind)
);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, at);
"""


@dataclass(frozen=True)
class Job:
    id: str
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    calling_ae: str
    input_path: str
    state: str
    attempts: int
    send_attempts: int
    next_attempt_at: float
    received_at: float
    updated_at: float
    model: str
    last_error: str
    task_id: str = ""
    worker: str = ""


@dataclass(frozen=True)
class Output:
    job_id: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    state: str
    status: int | None
    sent_at: float | None


class Journal:
    """Thread-safe access to the journal; every public method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
        for col in ("task_id", "worker"):  # journals made before these columns existed
            if col not in cols:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {col} TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def check_writable(self) -> None:
        """Raise if the journal cannot take a write transaction (liveness check)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("ROLLBACK")

    # -- helpers ---------------------------------------------------------
    def _tx(self):
        return _Tx(self)

    def _event(self, job_id: str, event: str, detail: str = "", at: float | None = None) -> None:
        self._db.execute(
            "INSERT INTO events(job_id, at, event, detail) VALUES (?,?,?,?)",
            (job_id, time.time() if at is None else at, event, detail),
        )

    # -- intake ----------------------------------------------------------
    def add_job(
        self,
        *,
        job_id: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_uid: str,
        calling_ae: str,
        input_path: str,
        model: str,
    ) -> None:
        now = time.time()
        with self._tx():
            self._db.execute(
                "INSERT INTO jobs(id, sop_instance_uid, sop_class_uid, study_uid, calling_ae, input_path,"
                " state, received_at, updated_at, model) VALUES (?,?,?,?,?,?, 'received', ?, ?, ?)",
                (job_id, sop_instance_uid, sop_class_uid, study_uid, calling_ae, input_path, now, now, model),
            )
            self._event(job_id, "received", f"from {calling_ae}", now)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:16]

    def find_processed(self, sop_instance_uid: str, model: str) -> Job | None:
        """A job for the same input and model that is done or still in progress."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE sop_instance_uid=? AND model=? AND state != 'dead'"
                " ORDER BY received_at DESC LIMIT 1",
                (sop_instance_uid, model),
            ).fetchone()
        return Job(**row) if row else None

    def queue_depth(self) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('received','processing','encoded')"
            ).fetchone()[0]

    # -- executor --------------------------------------------------------
    def recover(self, max_attempts: int) -> int:
        """At start: jobs left in ``processing`` by a crash go back to ``received``,
        or to ``dead`` when they have already crashed ``max_attempts`` times (poison)."""
        with self._tx():
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE state='processing'").fetchall()
            for r in rows:
                if r["attempts"] >= max_attempts:
                    self._set(r["id"], "dead", f"poison job: {r['attempts']} processing attempts did not finish")
                else:
                    self._set(r["id"], "received", "recovered after restart")
        return len(rows)

    def claim(self, now: float | None = None) -> Job | None:
        """Take the oldest due ``received`` job and move it to ``processing``."""
        now = time.time() if now is None else now
        with self._tx():
            # Jobs that were already tried (interrupted by a crash, or failed) go after fresh
            # ones: a suspect poison job never holds up the queue.
            row = self._db.execute(
                "SELECT id FROM jobs WHERE state='received' AND next_attempt_at <= ?"
                " ORDER BY attempts, received_at LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            self._db.execute(
                "UPDATE jobs SET state='processing', attempts=attempts+1, updated_at=? WHERE id=?",
                (now, row["id"]),
            )
            self._event(row["id"], "processing")
            return self._get(row["id"])

    def mark_encoded(self, job_id: str, outputs: list[tuple[str, str, str, str]]) -> None:
        """Record the encoded outputs (kind, sop_class_uid, sop_instance_uid, path)."""
        with self._tx():
            for kind, cls_uid, inst_uid, path in outputs:
                self._db.execute(
                    "INSERT INTO outputs(job_id, kind, sop_class_uid, sop_instance_uid, path, state)"
                    " VALUES (?,?,?,?,?, 'encoded')"
                    " ON CONFLICT(job_id, kind) DO UPDATE SET sop_instance_uid=excluded.sop_instance_uid,"
                    " path=excluded.path, sop_class_uid=excluded.sop_class_uid",
                    (job_id, kind, cls_uid, inst_uid, path),
                )
            self._db.execute(
                "UPDATE jobs SET state='encoded', next_attempt_at=0, updated_at=? WHERE id=?",
                (time.time(), job_id),
            )
            self._event(job_id, "encoded", ", ".join(o[0] for o in outputs))

    def retry_processing(self, job_id: str, error: str, delay: float) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE jobs SET state='received', next_attempt_at=?, last_error=?, updated_at=? WHERE id=?",
                (time.time() + delay, error, time.time(), job_id),
            )
            self._event(job_id, "processing-failed", error)

    # -- outbox ----------------------------------------------------------
    def due_for_send(self, now: float | None = None, limit: int = 32) -> list[Job]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state='encoded' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, received_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [Job(**r) for r in rows]

    def next_due_at(self) -> float | None:
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE state IN ('encoded','received')"
            ).fetchone()
        return row[0]

    def outputs(self, job_id: str) -> list[Output]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outputs WHERE job_id=? ORDER BY rowid", (job_id,)
            ).fetchall()
        return [Output(**r) for r in rows]

    def mark_sent(self, job_id: str, kind: str, status: int) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE outputs SET state='sent', status=?, sent_at=? WHERE job_id=? AND kind=?",
                (status, time.time(), job_id, kind),
            )
            detail = f"{kind} status 0x{status:04X}"
            self._event(job_id, "sent", detail)

    def mark_done(self, job_id: str) -> None:
        with self._tx():
            self._set(job_id, "done", "")

    def schedule_send_retry(self, job_id: str, error: str, delay: float) -> None:
        with self._tx():
            self._db.execute(
                "UPDATE jobs SET send_attempts=send_attempts+1, next_attempt_at=?, last_error=?,"
                " updated_at=? WHERE id=?",
                (time.time() + delay, error, time.time(), job_id),
            )
            self._event(job_id, "send-failed", f"{error}; retry in {delay:.0f} s")

    def mark_dead(self, job_id: str, reason: str) -> None:
        with self._tx():
            self._set(job_id, "dead", reason)

    # -- distributed executor ------------------------------------------
    def set_task(self, job_id: str, task_id: str) -> None:
        """Record that a claimed (``processing``) job was handed to a remote task."""
        with self._tx():
            self._db.execute("UPDATE jobs SET task_id=?, updated_at=? WHERE id=?", (task_id, time.time(), job_id))
            self._event(job_id, "dispatched", f"task {task_id}")

    def in_flight_tasks(self) -> list[Job]:
        """Jobs handed to remote tasks whose outcome is not known yet (survives restarts)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state='processing' AND task_id != '' ORDER BY received_at"
            ).fetchall()
        return [Job(**r) for r in rows]

    def record_remote_result(
        self,
        job_id: str,
        *,
        worker: str,
        outputs: list[tuple[str, str, str, str, int | None]],
        state: str,
        error: str = "",
    ) -> None:
        """A remote worker's outcome: outputs (kind, class, instance UID, path, status or None if
        not sent) and the final state ('done', 'dead', or 'received' to run again)."""
        if state not in ("done", "dead", "received"):
            raise ValueError(f"unexpected remote state {state!r}")
        now = time.time()
        with self._tx():
            for kind, cls_uid, inst_uid, path, status in outputs:
                self._db.execute(
                    "INSERT INTO outputs(job_id, kind, sop_class_uid, sop_instance_uid, path, state, status, sent_at)"
                    " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(job_id, kind) DO UPDATE SET state=excluded.state,"
                    " status=excluded.status, sent_at=excluded.sent_at, sop_instance_uid=excluded.sop_instance_uid",
                    (job_id, kind, cls_uid, inst_uid, path, "sent" if status is not None else "encoded", status,
                     now if status is not None else None),
                )
                if status is not None:
                    self._event(job_id, "sent", f"{kind} status 0x{status:04X} (by {worker})")
            self._db.execute(
                "UPDATE jobs SET worker=?, task_id=CASE WHEN ?='received' THEN '' ELSE task_id END WHERE id=?",
                (worker, state, job_id),
            )
            self._set(job_id, state, error)

    def recover_local_only(self, max_attempts: int) -> int:
        """Like :meth:`recover`, but leaves jobs that were dispatched to remote tasks alone."""
        with self._tx():
            rows = self._db.execute(
                "SELECT id, attempts FROM jobs WHERE state='processing' AND task_id=''"
            ).fetchall()
            for r in rows:
                if r["attempts"] >= max_attempts:
                    self._set(r["id"], "dead", f"poison job: {r['attempts']} processing attempts did not finish")
                else:
                    self._set(r["id"], "received", "recovered after restart")
        return len(rows)

    # -- operators -------------------------------------------------------
    def requeue(self, job_id: str) -> bool:
        """Put a dead job back: to ``encoded`` when its outputs exist, else ``received``."""
        with self._tx():
            job = self._get(job_id)
            if job is None or job.state != "dead":
                return False
            has_outputs = self._db.execute(
                "SELECT COUNT(*) FROM outputs WHERE job_id=?", (job_id,)
            ).fetchone()[0]
            target = "encoded" if has_outputs == 4 else "received"
            self._db.execute(
                "UPDATE jobs SET state=?, attempts=0, send_attempts=0, next_attempt_at=0, received_at=?,"
                " updated_at=? WHERE id=?",
                (target, time.time(), time.time(), job_id),
            )
            self._event(job_id, "requeued", f"by operator, to {target}")
            return True

    def list_jobs(self, state: str | None = None, limit: int = 1000) -> list[Job]:
        with self._lock:
            if state:
                rows = self._db.execute(
                    "SELECT * FROM jobs WHERE state=? ORDER BY received_at DESC LIMIT ?", (state, limit)
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM jobs ORDER BY received_at DESC LIMIT ?", (limit,)
                ).fetchall()
        return [Job(**r) for r in rows]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._get(job_id)

    def events(self, job_id: str) -> list[tuple[float, str, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT at, event, detail FROM events WHERE job_id=? ORDER BY at, rowid", (job_id,)
            ).fetchall()
        return [(r["at"], r["event"], r["detail"]) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        out = {s: 0 for s in STATES}
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def purge(self, older_than: float, states: tuple[str, ...] = ("done",)) -> list[str]:
        """Delete journal rows of finished jobs last updated before ``older_than``; returns their ids."""
        marks = ",".join("?" * len(states))
        with self._tx():
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT id FROM jobs WHERE state IN ({marks}) AND updated_at < ?", (*states, older_than)
                ).fetchall()
            ]
            for job_id in ids:
                self._db.execute("DELETE FROM events WHERE job_id=?", (job_id,))
                self._db.execute("DELETE FROM outputs WHERE job_id=?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        return ids

    def to_dict(self, job: Job) -> dict:
        d = job.__dict__.copy()
        d["outputs"] = [o.__dict__ for o in self.outputs(job.id)]
        d["events"] = [{"at": a, "event": e, "detail": t} for a, e, t in self.events(job.id)]
        return json.loads(json.dumps(d))

    # -- internals -------------------------------------------------------
    def _get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job(**row) if row else None

    def _set(self, job_id: str, state: str, detail: str) -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        self._db.execute(
            "UPDATE jobs SET state=?, updated_at=?, last_error=CASE WHEN ?='' THEN last_error ELSE ? END"
            " WHERE id=?",
            (state, time.time(), detail, detail, job_id),
        )
        self._event(job_id, state, detail)


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT under the journal lock; ROLLBACK on error."""

    def __init__(self, j: Journal) -> None:
        self.j = j

    def __enter__(self):
        self.j._lock.acquire()
        self.j._db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.j._db.execute("COMMIT")
            else:
                self.j._db.execute("ROLLBACK")
        finally:
            self.j._lock.release()
        return False
