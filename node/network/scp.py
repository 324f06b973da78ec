"""The DICOM SCP: an AE with C-ECHO and C-STORE, whose store handler only hands
the received bytes to intake and returns its status (pynetdicom's event-handler design)."""

from __future__ import annotations

import logging
import time
from typing import Callable

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from node.intake.intake import CANNOT_UNDERSTAND, Intake
from node.network.sopclasses import (
    INPUT_TRANSFER_SYNTAXES,
    OUTPUT_CLASS_TRANSFER_SYNTAXES,
    OUTPUT_ONLY_CLASSES,
)

log = logging.getLogger("dermnode.scp")
audit = logging.getLogger("dermnode.audit")


def build_ae(
    *,
    ae_title: str,
    input_classes: list[str],
    max_associations: int,
    max_pdu: int,
    allowed_calling_aets: list[str],
    acse_timeout: float = 30,
    dimse_timeout: float = 60,
    network_timeout: float = 60,
) -> AE:
    ae = AE(ae_title=ae_title)
    ae.maximum_associations = max_associations
    ae.maximum_pdu_size = max_pdu
    ae.require_called_aet = True
    if allowed_calling_aets:
        ae.require_calling_aet = list(allowed_calling_aets)
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


def make_handlers(intake: Intake, on_association: Callable[[str], None] = lambda outcome: None) -> list:
    def handle_store(event) -> int:
        assoc = event.assoc
        calling = assoc.requestor.ae_title
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
        except Exception as exc:  # never let a bug crash the association thread silently
            log.exception("intake failed on a C-STORE from %s: %s", calling, exc)
            decision_status = 0xA700
            _count(assoc, decision_status)
            return decision_status
        _count(assoc, decision.status)
        return decision.status

    def handle_open(event) -> None:
        event.assoc._dermnode_audit = {"start": time.time(), "statuses": {}}  # noqa: SLF001

    def handle_released(event) -> None:
        _audit(event.assoc, "released")
        on_association("released")

    def handle_aborted(event) -> None:
        _audit(event.assoc, "aborted")
        on_association("aborted")

    def handle_rejected(event) -> None:
        _audit(event.assoc, "rejected")
        on_association("rejected")

    return [
        (evt.EVT_C_STORE, handle_store),
        (evt.EVT_CONN_OPEN, handle_open),
        (evt.EVT_RELEASED, handle_released),
        (evt.EVT_ABORTED, handle_aborted),
        (evt.EVT_REJECTED, handle_rejected),
    ]


def _count(assoc, status: int) -> None:
    info = getattr(assoc, "_dermnode_audit", None)
    if info is not None:
        info["statuses"][f"0x{status:04X}"] = info["statuses"].get(f"0x{status:04X}", 0) + 1


def _audit(assoc, outcome: str) -> None:
    info = getattr(assoc, "_dermnode_audit", None) or {"start": time.time(), "statuses": {}}
    try:
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
    except Exception:  # pragma: no cover - socket already gone
        peer = "?"
    n = sum(info["statuses"].values())
    audit.info(
        "association %s calling=%s called=%s peer=%s instances=%d statuses=%s duration=%.3fs tls=%s",
        outcome,
        assoc.requestor.ae_title,
        assoc.acceptor.ae_title,
        peer,
        n,
        ",".join(f"{k}x{v}" for k, v in sorted(info["statuses"].items())) or "-",
        time.time() - info["start"],
        "no",
    )
