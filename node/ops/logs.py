"""Logging set-up: text or JSON lines, with the job id on every line of a job.

Patient identifying data never goes into INFO-level messages: the code logs
UIDs and job ids only. The audit logger (``dermnode.audit``) can be routed to a
separate file for a SIEM.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job = getattr(record, "job_id", None)
        if job:
            d["job_id"] = job
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, ensure_ascii=False)


class _Text(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        s = super().format(record)
        job = getattr(record, "job_id", None)
        return s + (f" [job={job}]" if job and f"job {job}" not in s else "")


def setup_logging(level: str = "INFO", fmt: str = "text", stream=None, audit_file: str = "") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(_Json() if fmt == "json" else _Text())
    root.addHandler(h)
    root.setLevel(level)
    audit = logging.getLogger("dermnode.audit")
    for old in list(audit.handlers):
        audit.removeHandler(old)
    audit.setLevel(logging.INFO)  # audit lines are kept whatever the main level
    if audit_file:
        fh = logging.FileHandler(audit_file, encoding="utf-8")
        fh.setFormatter(_Json() if fmt == "json" else _Text())
        audit.addHandler(fh)
    # pynetdicom logs dataset summaries (which can hold patient names) at INFO/DEBUG;
    # highdicom narrates every module it copies at INFO.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # pydicom warns about invalid element values by quoting them, a patient name included:
    # do not validate on reading (the node checks what it needs and never trusts the rest).
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
