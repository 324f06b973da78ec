"""The conformance statement's SOP class and transfer syntax tables equal what the AE accepts."""

import re
from pathlib import Path

from node.config import load_settings
from node.network.scp import accepted_table, build_ae
from node.network.sopclasses import OUTPUT_ONLY_CLASSES, SEND_TRANSFER_SYNTAXES, VERIFICATION

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(title)
    nxt = re.search(r"\n#{2,4} ", text[start + len(title):])
    return text[start: start + len(title) + (nxt.start() if nxt else len(text))]


def _uids(block: str) -> list[str]:
    return re.findall(r"\|\s*(1\.2\.840\.10008[0-9.]*)\s*\|", block)


def _tables(section: str) -> list[list[str]]:
    """UID columns of each markdown table in a section."""
    tables, current = [], []
    for line in section.splitlines():
        if line.startswith("|"):
            current.extend(_uids(line + "|"))
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _ae():
    s = load_settings(env={})
    return s, build_ae(ae_title=s.node.ae_title, input_classes=s.node.sop_classes,
                       max_associations=s.limits.max_associations, max_pdu=s.limits.max_pdu)


def test_input_tables_match_the_ae():
    s, ae = _ae()
    accepted = accepted_table(ae)
    classes, syntaxes = _tables(_section("#### 2.3.1"))
    assert classes == s.node.sop_classes
    for uid in classes:
        assert accepted[uid] == syntaxes


def test_output_class_tables_match_the_ae():
    _, ae = _ae()
    accepted = accepted_table(ae)
    classes, syntaxes = _tables(_section("#### 2.3.2"))
    assert classes == list(OUTPUT_ONLY_CLASSES)
    for uid in classes:
        assert accepted[uid] == syntaxes


def test_scp_accepts_nothing_undocumented():
    s, ae = _ae()
    documented = set(s.node.sop_classes) | set(OUTPUT_ONLY_CLASSES) | {VERIFICATION}
    assert set(accepted_table(ae)) == documented


def test_scu_table_matches_the_sender():
    from node.network.scu import Destination, Sender

    s = load_settings(env={})
    sender = Sender(Destination("X", "127.0.0.1", 1, "DERMNODE"), [*s.node.sop_classes, *OUTPUT_ONLY_CLASSES])
    proposed = {}
    for cx in sender._ae.requested_contexts:
        proposed[cx.abstract_syntax] = list(cx.transfer_syntax)
    [classes] = _tables(_section("### 2.4"))[:1]
    assert classes == list(proposed)
    for uid, ts in proposed.items():
        if uid != VERIFICATION:
            assert ts == SEND_TRANSFER_SYNTAXES
    assert "Explicit VR Little Endian and Implicit VR Little Endian" in " ".join(_section("### 2.4").split())


def test_status_codes_documented():
    from node.intake import intake

    block = _section("#### 2.3.4")
    for code in (intake.SUCCESS, intake.OUT_OF_RESOURCES, intake.DATASET_MISMATCH, intake.CANNOT_UNDERSTAND):
        assert f"0x{code:04X}" in block
