"""Intake decisions (the C-STORE critical path) on real datasets, with a real spool and journal."""

from pathlib import Path

import pytest
from pydicom import Dataset

from node.evidence.identity import NodeIdentity
from node.intake.intake import Intake, is_own_output
from node.intake.journal import Journal
from node.intake.spool import Spool

DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def _ds(**kw) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = DMS
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.Rows = ds.Columns = 100
    for k, v in kw.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


@pytest.fixture
def make(tmp_path):
    made = []

    def _make(**kw) -> Intake:
        spool = Spool(tmp_path / "store")
        journal = Journal(tmp_path / "store" / "journal.sqlite")
        params = dict(spool=spool, journal=journal, identity=NodeIdentity(), model_key="m:1",
                      accepted_classes=[DMS], min_free_bytes=0, max_queue=100, header_check=lambda ds: None)
        params.update(kw)
        it = Intake(**params)
        made.append(it)
        return it

    yield _make
    for it in made:
        it.journal.close()


def test_accept_stores_then_acknowledges(make):
    woken = []
    it = make(on_job=woken.append)
    d = it.accept(b"RAW-BYTES", _ds(), DMS, "SCU")
    assert d.status == 0x0000 and d.job_id
    assert Path(it.spool.input_path(d.job_id)).read_bytes() == b"RAW-BYTES"
    job = it.journal.get(d.job_id)
    assert job.state == "received" and job.sop_instance_uid == "1.2.3.4" and job.calling_ae == "SCU"
    assert woken == [d.job_id]


@pytest.mark.parametrize(
    "ds, ctx, status",
    [
        (_ds(SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.4"), DMS, 0xA900),  # dataset vs context
        (_ds(SOPInstanceUID=None), DMS, 0xC000),
        (_ds(StudyInstanceUID=None), DMS, 0xC000),
        (_ds(SOPClassUID=None), DMS, 0xC000),
    ],
)
def test_refusals(make, ds, ctx, status):
    it = make()
    d = it.accept(b"x", ds, ctx, "SCU")
    assert d.status == status
    assert it.journal.list_jobs() == [] and list(it.spool.inbox.iterdir()) == []


def test_header_check_refusal_is_c000(make):
    def check(ds):
        raise ValueError("65535x65535 pixels exceeds the limit")

    it = make(header_check=check)
    d = it.accept(b"x", _ds(), DMS, "SCU")
    assert d.status == 0xC000 and "65535" in d.reason


def test_disk_watermark_gives_a700_and_writes_nothing(make):
    it = make(min_free_bytes=2**62)
    d = it.accept(b"x" * 1000, _ds(), DMS, "SCU")
    assert d.status == 0xA700 and "watermark" in d.reason
    assert it.journal.list_jobs() == [] and list(it.spool.inbox.iterdir()) == [] and list(it.spool.tmp.iterdir()) == []


def test_queue_watermark(make):
    it = make(max_queue=2)
    assert it.accept(b"x", _ds(SOPInstanceUID="1.1"), DMS, "SCU").status == 0
    assert it.accept(b"x", _ds(SOPInstanceUID="1.2"), DMS, "SCU").status == 0
    d = it.accept(b"x", _ds(SOPInstanceUID="1.3"), DMS, "SCU")
    assert d.status == 0xA700 and "queue" in d.reason


def test_storage_failure_is_never_acknowledged(make, monkeypatch):
    it = make()

    def boom(job_id, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(it.spool, "store_input", boom)
    d = it.accept(b"x", _ds(), DMS, "SCU")
    assert d.status == 0xA700 and "No space" in d.reason
    assert it.journal.list_jobs() == []


def test_duplicate_is_acknowledged_not_reprocessed(make):
    it = make()
    first = it.accept(b"x", _ds(), DMS, "SCU")
    second = it.accept(b"x", _ds(), DMS, "SCU")
    assert first.job_id and second.status == 0 and second.job_id is None
    assert len(it.journal.list_jobs()) == 1 and it.stats.duplicates == 1
    third = make(resend_duplicates=True).accept(b"x", _ds(), DMS, "SCU")
    assert third.job_id  # configured to resend


def test_own_outputs_are_ignored_with_success(make):
    it = make()
    own_image = _ds(ImageType=["DERIVED", "SECONDARY"], Manufacturer=NodeIdentity().manufacturer,
                    ManufacturerModelName=NodeIdentity().model_name)
    seg = _ds(SOPClassUID=SEG)
    for ds in (own_image, seg):
        d = it.accept(b"x", ds, str(ds.SOPClassUID), "PACS")
        assert d.status == 0 and d.job_id is None
    assert it.stats.ignored_own == 2 and it.journal.list_jobs() == []


def test_is_own_output_is_specific():
    ident = NodeIdentity()
    assert not is_own_output(_ds(ImageType=["ORIGINAL", "PRIMARY"], Manufacturer=ident.manufacturer,
                                 ManufacturerModelName=ident.model_name), ident)
    assert not is_own_output(_ds(ImageType=["DERIVED", "SECONDARY"], Manufacturer="Other AI"), ident)
    assert is_own_output(_ds(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.34"), ident)
