"""Durable spool: received datasets and encoded outputs as files, fsync'd before use.

Layout under the storage dir::

    spool/in/<job_id>.dcm            the received bytes (file meta + dataset, as sent)
    spool/out/<job_id>/<kind>.dcm    the encoded derived objects
    spool/tmp/                        partial writes; cleaned at start

A file is written to ``tmp/``, fsync'd, renamed into place, and the directory
is fsync'd, so after a crash a file is either complete or absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.inbox = self.root / "spool" / "in"
        self.outbox = self.root / "spool" / "out"
        self.tmp = self.root / "spool" / "tmp"
        for d in (self.inbox, self.outbox, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():  # partial writes of a crashed run
            if leftover.is_file():
                leftover.unlink()

    def _write(self, final: Path, chunks: list[bytes] | bytes) -> Path:
        tmp = self.tmp / (final.parent.name + "." + final.name + ".part")
        with open(tmp, "wb") as fh:
            if isinstance(chunks, (bytes, bytearray, memoryview)):
                fh.write(chunks)
            else:
                for c in chunks:
                    fh.write(c)
            fh.flush()
            os.fsync(fh.fileno())
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final

    def input_path(self, job_id: str) -> Path:
        return self.inbox / f"{job_id}.dcm"

    def output_path(self, job_id: str, kind: str) -> Path:
        return self.outbox / job_id / f"{kind}.dcm"

    def store_input(self, job_id: str, data: bytes) -> Path:
        """Durably store the received bytes of one C-STORE request."""
        return self._write(self.input_path(job_id), data)

    def store_output(self, job_id: str, kind: str, data: bytes) -> Path:
        return self._write(self.output_path(job_id, kind), data)

    def remove_job(self, job_id: str) -> None:
        self.input_path(job_id).unlink(missing_ok=True)
        shutil.rmtree(self.outbox / job_id, ignore_errors=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize
