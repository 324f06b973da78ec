"""The DICOM SCP: an AE with C-ECHO and C-STORE, whose store handler only hands
the received bytes to intake and returns its status (pynetdicom's event-handler design)."""

from __future__ import annotations

import logging
import time
from typing import Callable

from node.network import tcp  # noqa: F401  (TCP_NODELAY on pynetdicom sockets)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.intake.intake import CANNOT_UNDERSTAND, Intake
from node.network.sopclasses import (
    INPUT_TRANSFER_SYNTAXES,
    OUTPUT_CLASS_TRANSFER_SYNTAXES,
    OUTPUT_ONLY_CLASSES,
)

log = logging.getLogger("dermnode.scp")

# Errors pydicom raises on malformed data when an element is first read.
_PARSE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, NotImplementedError, UnicodeError,
                 IndexError, OverflowError, __import__("struct").error)
audit = logging.getLogger("dermnode.audit")


def build_ae(
    *,
    ae_title: str,
    input_classes: list[str],
    max_associations: int,
    max_pdu: int,
    acse_timeout: float = 30,
    dimse_timeout: float = 60,
    network_timeout: float = 60,
) -> AE:
    """The SCP AE: called AE title must match; calling AE checks are in :class:`AccessPolicy`."""
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    ae.maximum_pdu_size = max_pdu
    ae.require_called_aet = True
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.add_supported_context(Verification)
    for uid in input_classes:
        ae.add_supported_context(uid, INPUT_TRANSFER_SYNTAXES)
    for uid in OUTPUT_ONLY_CLASSES:
        if uid not in input_classes:
            ae.add_supported_context(uid, OUTPUT_CLASS_TRANSFER_SYNTAXES)
    return ae


def accepted_table(ae: AE) -> dict[str, list[str]]:
    """SOP class -> transfer syntaxes, as the AE will accept them (for the conformance test)."""
    return {cx.abstract_syntax: list(cx.transfer_syntax) for cx in ae.supported_contexts}


class AccessPolicy:
    """Calling AE allowlist, optionally bound to source addresses.

    An empty allowlist accepts any calling AE title (documented as insecure).
    A rejected association gets A-ASSOCIATE-RJ "rejected-permanent, service-user,
    calling-AE-title-not-recognized" (1, 1, 3) and an audit line.
    """

    def __init__(self, allowed: list[str], hosts: dict[str, list[str]] | None = None) -> None:
        import socket

        self.allowed = {a.strip() for a in allowed}
        self.hosts: dict[str, set[str]] = {}
        for aet, names in (hosts or {}).items():
            addrs: set[str] = set()
            for name in names:
                try:
                    addrs.update(socket.gethostbyname_ex(name)[2])
                except OSError:
                    addrs.add(name)
            self.hosts[aet.strip()] = addrs

    def check(self, calling: str, address: str) -> str | None:
        """None when allowed, else the reason."""
        calling = calling.strip()
        if self.allowed and calling not in self.allowed:
            return f"calling AE title {calling!r} is not in node.allowed_calling_aets"
        bound = self.hosts.get(calling)
        if bound is not None and address not in bound:
            return f"calling AE title {calling!r} is not allowed from {address}"
        return None


def make_handlers(
    intake: Intake,
    on_association: Callable[[str], None] = lambda outcome: None,
    policy: AccessPolicy | None = None,
    max_dataset_bytes: int = 2**40,
    tls: bool = False,
) -> list:
    policy = policy or AccessPolicy([])

    def handle_requested(event) -> None:
        assoc = event.assoc
        assoc._dermnode_audit = {"start": time.time(), "statuses": {}, "tls": tls}  # noqa: SLF001
        calling = assoc.requestor.primitive.calling_ae_title
        reason = policy.check(calling, assoc.requestor.address)
        if reason:
            assoc.requestor.ae_title = calling
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()  # as pynetdicom does for its own rejections: waits until the RJ is sent
            _audit(assoc, "rejected", reason)
            on_association("rejected")

    def handle_store(event) -> int:
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        size = len(event.request.DataSet.getbuffer()) if hasattr(event.request.DataSet, "getbuffer") else 0
        if size > max_dataset_bytes:
            log.warning("C-STORE from %s refused: dataset of %d bytes exceeds limits.max_dataset_mb", calling, size)
            intake.stats.bump("refused", CANNOT_UNDERSTAND)
            _count(assoc, CANNOT_UNDERSTAND)
            return CANNOT_UNDERSTAND
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            raw = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # the peer sent something pydicom cannot parse
            log.warning("C-STORE from %s could not be parsed: %s", calling, exc)
            intake.stats.bump("refused", CANNOT_UNDERSTAND)
            _count(assoc, CANNOT_UNDERSTAND)
            return CANNOT_UNDERSTAND
        try:
            decision = intake.accept(raw, ds, event.context.abstract_syntax, calling)
        except _PARSE_ERRORS as exc:  # pydicom parses lazily: a malformed element shows up here
            log.warning("C-STORE from %s refused with 0xC000: cannot parse the dataset: %s: %s",
                        calling, type(exc).__name__, exc)
            intake.stats.bump("refused", CANNOT_UNDERSTAND)
            _count(assoc, CANNOT_UNDERSTAND)
            return CANNOT_UNDERSTAND
        except Exception as exc:  # anything else is ours (journal, disk): never acknowledge
            log.exception("intake failed on a C-STORE from %s: %s", calling, exc)
            _count(assoc, 0xA700)
            return 0xA700
        _count(assoc, decision.status)
        return decision.status

    def handle_released(event) -> None:
        _audit(event.assoc, "released")
        on_association("released")

    def handle_aborted(event) -> None:
        _audit(event.assoc, "aborted")
        on_association("aborted")

    def handle_rejected(event) -> None:  # rejections by pynetdicom itself (called AE, limits)
        _audit(event.assoc, "rejected", "called AE title or association limit")
        on_association("rejected")

    return [
        (evt.EVT_C_STORE, handle_store),
        (evt.EVT_REQUESTED, handle_requested),
        (evt.EVT_RELEASED, handle_released),
        (evt.EVT_ABORTED, handle_aborted),
        (evt.EVT_REJECTED, handle_rejected),
    ]


def _count(assoc, status: int) -> None:
    info = getattr(assoc, "_dermnode_audit", None)
    if info is not None:
        info["statuses"][f"0x{status:04X}"] = info["statuses"].get(f"0x{status:04X}", 0) + 1


def _audit(assoc, outcome: str, reason: str = "") -> None:
    info = getattr(assoc, "_dermnode_audit", None) or {"start": time.time(), "statuses": {}, "tls": False}
    try:
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
    except Exception:  # pragma: no cover - socket already gone
        peer = "?"
    n = sum(info["statuses"].values())
    try:
        called = assoc.requestor.primitive.called_ae_title
    except Exception:  # pragma: no cover
        called = assoc.acceptor.ae_title
    audit.info(
        "association %s calling=%s called=%s peer=%s instances=%d statuses=%s duration=%.3fs tls=%s%s",
        outcome,
        assoc.requestor.ae_title,
        called,
        peer,
        n,
        ",".join(f"{k}x{v}" for k, v in sorted(info["statuses"].items())) or "-",
        time.time() - info["start"],
        "yes" if info.get("tls") else "no",
        f" reason={reason!r}" if reason else "",
    )
