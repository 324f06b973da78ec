import random
import sqlite3

import pytest

from node.intake.journal import Journal
from node.outbox import backoff


def _add(j: Journal, sop="1.2.3", model="m:1") -> str:
    job_id = j.new_id()
    j.add_job(job_id=job_id, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.77.1.7",
              study_uid="1.2", calling_ae="SCU", input_path="/x", model=model)
    return job_id


@pytest.fixture
def j(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    yield journal
    journal.close()


def test_wal_and_full_sync(tmp_path, j):
    db = sqlite3.connect(tmp_path / "j.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_happy_path_transitions(j):
    job_id = _add(j)
    assert j.get(job_id).state == "received"
    job = j.claim()
    assert job.id == job_id and job.state == "processing" and job.attempts == 1
    assert j.claim() is None
    outs = [(k, "1.2.840.10008.5.1.4.1.1.66.4", f"2.25.{i}", f"/o/{k}") for i, k in enumerate(["image", "seg", "pmap", "sr"])]
    j.mark_encoded(job_id, outs)
    assert [x.id for x in j.due_for_send()] == [job_id]
    for k in ["image", "seg"]:
        j.mark_sent(job_id, k, 0)
    assert {o.kind: o.state for o in j.outputs(job_id)} == {"image": "sent", "seg": "sent", "pmap": "encoded", "sr": "encoded"}
    j.mark_done(job_id)
    assert j.get(job_id).state == "done"
    events = [e for _, e, _ in j.events(job_id)]
    assert events == ["received", "processing", "encoded", "sent", "sent", "done"]


def test_recover_after_crash_and_poison(j):
    a = _add(j, "1")
    b = _add(j, "2")
    j.claim()
    j.claim()
    # simulate: job a crashed 3 times already
    j._db.execute("UPDATE jobs SET attempts=3 WHERE id=?", (a,))
    assert j.recover(max_attempts=3) == 2
    assert j.get(a).state == "dead" and "poison" in j.get(a).last_error
    assert j.get(b).state == "received"
    assert j.claim().id == b  # the poison job does not block the others


def test_send_retry_schedule_is_persisted(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    job_id = _add(j)
    j.claim()
    j.mark_encoded(job_id, [("sr", "1.2", "2.25.1", "/o")])
    j.schedule_send_retry(job_id, "connection refused", 3600)
    assert j.due_for_send() == []
    j.close()
    j2 = Journal(tmp_path / "j.sqlite")  # restart
    job = j2.get(job_id)
    assert job.state == "encoded" and job.send_attempts == 1 and job.next_attempt_at > 0
    assert j2.due_for_send(now=job.next_attempt_at + 1)[0].id == job_id


def test_duplicates_and_requeue(j):
    job_id = _add(j, "9.9", "m:1")
    assert j.find_processed("9.9", "m:1").id == job_id
    assert j.find_processed("9.9", "m:2") is None
    j.claim()
    j.mark_dead(job_id, "permanent send failure")
    assert j.find_processed("9.9", "m:1") is None  # a dead job may be sent again
    assert j.requeue(job_id)
    assert j.get(job_id).state == "received"
    assert not j.requeue(job_id)  # only dead jobs


def test_failed_transaction_rolls_back(j):
    job_id = _add(j)
    with pytest.raises(sqlite3.IntegrityError):
        j.add_job(job_id=job_id, sop_instance_uid="x", sop_class_uid="x", study_uid="x",
                  calling_ae="x", input_path="x", model="x")
    assert len(j.list_jobs()) == 1
    assert len(j.events(job_id)) == 1


def test_purge(j):
    job_id = _add(j)
    j.claim()
    j.mark_done(job_id)
    assert j.purge(older_than=0) == []
    import time

    assert j.purge(older_than=time.time() + 1) == [job_id]
    assert j.get(job_id) is None


def test_backoff_grows_and_is_capped():
    rng = random.Random(1)
    delays = [backoff(n, 5, 3600, rng) for n in range(12)]
    assert 4 <= delays[0] <= 6
    assert all(b > a for a, b in zip(delays[:8], delays[1:8]))
    assert max(delays) <= 3600
    assert delays[-1] >= 3600 * 0.8
