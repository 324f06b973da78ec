"""The DICOM SCU that sends derived objects to the destination AE.

It keeps one association open and reuses it across objects and jobs, checks the
status of every C-STORE response, and classifies every failure as transient
(retry later) or permanent (dead-letter).
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from node.network import tcp  # noqa: F401  (TCP_NODELAY on pynetdicom sockets)
from pynetdicom import AE, _config, evt
from pydicom.uid import ExplicitVRLittleEndian

from node.network.sopclasses import NAMES, SEND_TRANSFER_SYNTAXES, VERIFICATION

log = logging.getLogger("dermnode.scu")

# Send files as they are on disk (no decode and re-encode by pynetdicom). Our outputs are
# written in Explicit VR Little Endian; see Sender.send_file for a peer that only takes Implicit.
_config.STORE_SEND_CHUNKED_DATASET = True

#: Warning statuses: the object was stored (possibly coerced); log and treat as success.
WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


def _let_reactor_resume(assoc, limit: float = 0.05) -> None:
    """Wait (briefly) until pynetdicom's reactor thread has left its pause after a request.

    pynetdicom 3.0 pauses the association's reactor around each request and, before the
    next request, waits until ``_is_paused`` is true. Right after a request the flag is
    still true from the previous pause until the reactor thread wakes, so a request sent
    back-to-back can go out while the reactor is about to resume; the reactor then
    swallows the response ("Received unexpected C-STORE service message") and the send
    waits for the DIMSE timeout. Seen in bursts against fast peers.
    """
    deadline = time.monotonic() + limit
    while getattr(assoc, "_is_paused", False) and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0002)


class SendError(Exception):
    """A send that did not succeed; ``transient`` says whether retrying may help."""

    def __init__(self, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


def classify_status(status: int) -> str:
    """'success', 'warning', 'transient' or 'permanent' for a C-STORE response status."""
    if status == 0x0000:
        return "success"
    if status in WARNING_STATUSES:
        return "warning"
    if 0xA700 <= status <= 0xA7FF:  # out of resources: the peer may recover
        return "transient"
    # 0xA9xx dataset/SOP class mismatch, 0xCxxx cannot understand, 0x0122 SOP class
    # not supported, 0x0124 not authorised, and anything unknown: retrying the same
    # bytes cannot help.
    return "permanent"


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    timeout: float = 30.0
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""


class Sender:
    """Sends files to one destination over a reused association. Not thread-safe:
    one sender per outbox thread."""

    def __init__(self, dest: Destination, sop_classes: list[str]) -> None:
        self.dest = dest
        self.sop_classes = list(dict.fromkeys(sop_classes))
        self._ae = AE(ae_title=dest.calling_ae_title)
        self._ae.acse_timeout = dest.timeout
        self._ae.dimse_timeout = dest.timeout
        self._ae.network_timeout = dest.timeout
        for uid in self.sop_classes:
            self._ae.add_requested_context(uid, SEND_TRANSFER_SYNTAXES)
        self._ae.add_requested_context(VERIFICATION)
        self._assoc = None
        self.associations_opened = 0
        self._tls_args = None
        if dest.tls:
            from node.network.tls import client_context

            self._tls_args = (client_context(dest.tls_ca, dest.tls_cert, dest.tls_key), dest.host)

    def _associate(self):
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        rejection: dict[str, int] = {}

        def on_acse(event) -> None:
            p = event.primitive
            if getattr(p, "result", None) in (0x01, 0x02):
                rejection.update(result=p.result, source=p.result_source, reason=p.diagnostic)

        try:
            assoc = self._ae.associate(
                self.dest.host,
                self.dest.port,
                ae_title=self.dest.ae_title,
                evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)],
                tls_args=self._tls_args,
            )
        except (OSError, ssl.SSLError) as exc:
            raise SendError(f"cannot connect to {self.dest.host}:{self.dest.port}: {exc}", transient=True) from exc
        if assoc.is_established:
            self._assoc = assoc
            self.associations_opened += 1
            return assoc
        if assoc.is_rejected:
            permanent = rejection.get("result") == 0x01
            raise SendError(
                f"association rejected by {self.dest.ae_title} ({'permanent' if permanent else 'transient'},"
                f" source {rejection.get('source')}, reason {rejection.get('reason')})",
                transient=not permanent,
            )
        if assoc.is_aborted:
            raise SendError(
                f"association with {self.dest.ae_title}@{self.dest.host}:{self.dest.port} aborted"
                " (no accepted presentation context, or the peer aborted)",
                transient=True,
            )
        raise SendError(
            f"association with {self.dest.ae_title}@{self.dest.host}:{self.dest.port} failed"
            " (connection refused or timed out)",
            transient=True,
        )

    def send_file(self, path: str | Path, sop_class: str) -> int:
        """Send one file; return the success/warning status or raise :class:`SendError`."""
        assoc = self._associate()
        accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class}
        if not accepted:
            self.close()
            raise SendError(
                f"{self.dest.ae_title} does not accept {NAMES.get(sop_class, sop_class)} ({sop_class})",
                transient=False,
                status=0x0122,
            )
        try:
            if ExplicitVRLittleEndian in accepted:
                rsp = assoc.send_c_store(Path(path))  # streamed from the file as encoded
            else:  # the peer took only Implicit VR: let pynetdicom convert the dataset
                import pydicom

                rsp = assoc.send_c_store(pydicom.dcmread(path))
        except (OSError, RuntimeError, ValueError) as exc:
            self.close()
            raise SendError(f"C-STORE of {Path(path).name} failed: {exc}", transient=True) from exc
        _let_reactor_resume(assoc)
        status = getattr(rsp, "Status", None)
        if status is None:  # timeout, abort or invalid response
            self.close()
            raise SendError(
                f"no valid C-STORE response for {Path(path).name} (timeout or association aborted)",
                transient=True,
            )
        status = int(status)
        kind = classify_status(status)
        if kind == "warning":
            log.warning("destination stored %s with warning status 0x%04X", Path(path).name, status)
            return status
        if kind == "success":
            return status
        comment = str(rsp.get("ErrorComment", "")) if hasattr(rsp, "get") else ""
        raise SendError(
            f"destination answered 0x{status:04X} for {Path(path).name}" + (f": {comment}" if comment else ""),
            transient=kind == "transient",
            status=status,
        )

    def echo(self) -> int:
        assoc = self._ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=self._tls_args)
        try:
            if not assoc.is_established:
                raise SendError("association failed", transient=True)
            rsp = assoc.send_c_echo()
            return int(getattr(rsp, "Status", 0xFFFF))
        finally:
            if assoc.is_established:
                assoc.release()

    def close(self) -> None:
        if self._assoc is not None:
            try:
                if self._assoc.is_established:
                    self._assoc.release()
            except Exception:  # pragma: no cover
                pass
            self._assoc = None
