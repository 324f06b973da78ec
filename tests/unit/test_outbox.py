"""The outbox and the SCU against a real pynetdicom SCP answering chosen statuses."""

from __future__ import annotations

import time

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from node.intake.journal import Journal
from node.intake.spool import Spool
from node.network.scu import Destination, Sender, SendError, classify_status
from node.outbox import Outbox
from tests.peers import free_port

SEG = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.mark.parametrize("status, kind", [
    (0x0000, "success"), (0xB000, "warning"), (0xB007, "warning"), (0x0001, "warning"),
    (0xA700, "transient"), (0xA7FF, "transient"), (0xA900, "permanent"), (0xC000, "permanent"),
    (0x0122, "permanent"), (0x0124, "permanent"), (0xFE00, "permanent"),
])
def test_status_classes(status, kind):
    assert classify_status(status) == kind


class Scp:
    def __init__(self, statuses: list[int], syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian), aet="PACS"):
        self.statuses = list(statuses)
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title=aet)
        ae.add_supported_context(SEG, list(syntaxes))
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.associations = 0
        self.server.bind(evt.EVT_ESTABLISHED, self._est)

    def _est(self, event):
        self.associations += 1

    def _store(self, event):
        status = self.statuses.pop(0) if self.statuses else 0x0000
        if status in (0x0000, 0xB000):
            self.received.append(str(event.dataset.SOPInstanceUID))
        return status

    def stop(self):
        self.server.shutdown()


def _file(tmp_path, i: int):
    ds = Dataset()
    ds.SOPClassUID = SEG
    ds.SOPInstanceUID = f"2.25.{1000 + i}"
    ds.PatientID = "X"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SEG
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    p = tmp_path / f"{i}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


def _job(j: Journal, tmp_path, n_outputs=4):
    job_id = j.new_id()
    j.add_job(job_id=job_id, sop_instance_uid=f"1.{job_id}", sop_class_uid=SEG, study_uid="1",
              calling_ae="T", input_path="/x", model="m")
    j.claim()
    outs = [(f"k{i}", SEG, f"2.25.{1000 + i}", str(_file(tmp_path, i))) for i in range(n_outputs)]
    j.mark_encoded(job_id, outs)
    return job_id


def _outbox(tmp_path, port, aet="PACS"):
    j = Journal(tmp_path / "j.sqlite")
    ob = Outbox(journal=j, spool=Spool(tmp_path / "s"),
                destination=Destination(aet, "127.0.0.1", port, "DERMNODE", timeout=10),
                sop_classes=[SEG], initial_delay=5, max_delay=60, max_age=3600, retention=3600)
    return j, ob


def test_reuses_one_association_and_accepts_warnings(tmp_path, caplog):
    scp = Scp([0x0000, 0xB000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000, 0x0000])
    try:
        j, ob = _outbox(tmp_path, scp.port)
        a, b = _job(j, tmp_path), _job(j, tmp_path)
        assert ob.drain() == 2
        assert j.get(a).state == "done" and j.get(b).state == "done"
        assert scp.associations == 1  # 8 objects, 2 jobs, one association
        assert [o.status for o in j.outputs(a)] == [0x0000, 0xB000, 0x0000, 0x0000]
        assert "warning status 0xB000" in caplog.text
    finally:
        ob.stop()
        scp.stop()


def test_a700_is_retried_later_and_not_marked_sent(tmp_path):
    scp = Scp([0x0000, 0xA700])
    try:
        j, ob = _outbox(tmp_path, scp.port)
        a = _job(j, tmp_path)
        ob.drain()
        job = j.get(a)
        assert job.state == "encoded" and job.send_attempts == 1 and job.next_attempt_at > time.time() + 3
        assert [o.state for o in j.outputs(a)] == ["sent", "encoded", "encoded", "encoded"]
        assert "0xA700" in job.last_error
        j._db.execute("UPDATE jobs SET next_attempt_at=0 WHERE id=?", (a,))
        ob.drain()  # only the 3 unsent ones go again
        assert j.get(a).state == "done" and len(scp.received) == 4
    finally:
        ob.stop()
        scp.stop()


def test_c000_is_permanent(tmp_path):
    scp = Scp([0xC000])
    try:
        j, ob = _outbox(tmp_path, scp.port)
        a = _job(j, tmp_path)
        ob.drain()
        assert j.get(a).state == "dead" and "0xC000" in j.get(a).last_error
    finally:
        ob.stop()
        scp.stop()


def test_connection_refused_is_transient_and_rejection_is_permanent(tmp_path):
    j, ob = _outbox(tmp_path, free_port())
    a = _job(j, tmp_path)
    ob.drain()
    assert j.get(a).state == "encoded" and j.get(a).send_attempts == 1
    ob.stop()
    scp = Scp([], aet="PACS")
    scp.server.ae.require_called_aet = True
    try:
        j2, ob2 = _outbox(tmp_path / "2", scp.port, aet="WRONG")
        b = _job(j2, tmp_path)
        ob2.drain()
        assert j2.get(b).state == "dead" and "permanent" in j2.get(b).last_error
    finally:
        scp.stop()


def test_unsupported_sop_class_is_permanent(tmp_path):
    scp = Scp([])
    try:
        sender = Sender(Destination("PACS", "127.0.0.1", scp.port, "DERMNODE"), [SEG, "1.2.840.10008.5.1.4.1.1.30"])
        with pytest.raises(SendError) as e:
            sender.send_file(_file(tmp_path, 1), "1.2.840.10008.5.1.4.1.1.30")
        assert not e.value.transient and "does not accept" in str(e.value)
    finally:
        scp.stop()


def test_implicit_only_peer_gets_converted_data(tmp_path):
    scp = Scp([], syntaxes=(ImplicitVRLittleEndian,))
    try:
        sender = Sender(Destination("PACS", "127.0.0.1", scp.port, "DERMNODE"), [SEG])
        assert sender.send_file(_file(tmp_path, 7), SEG) == 0
        assert scp.received == ["2.25.1007"]
        sender.close()
    finally:
        scp.stop()


def test_expired_job_goes_to_dead_letter(tmp_path):
    j, ob = _outbox(tmp_path, free_port())
    ob.max_age = 0.0
    a = _job(j, tmp_path)
    ob.drain()
    assert j.get(a).state == "dead" and "not delivered within" in j.get(a).last_error
    ob.stop()
