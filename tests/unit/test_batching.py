"""The executor's runtime on CPU: micro-batching of the model call and the process pool.

The batcher is what a GPU node uses; here it runs the shipped model on CPU. Nothing is
timed: the wait is made long and the submissions are released together, so the batches
are full however slow the machine is.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _evidence_helpers import FIXTURE, IDENTITY, make_source  # noqa: E402
from _model_helpers import PACKAGE  # noqa: E402

from node.executor.batching import MicroBatcher  # noqa: E402
from node.executor.local import auto_inference_threads, auto_max_batch  # noqa: E402
from node.executor.pool import Stages  # noqa: E402
from node.pipeline.process import Prepared, ProcessOptions, classify, prepare  # noqa: E402

pytestmark = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"fixture image missing: {FIXTURE}")


@pytest.fixture(scope="module")
def clf():
    from node.model.classifier import Classifier

    return Classifier.load(PACKAGE, device="cpu")


def _prepared(n: int, rows: int, cols: int) -> list[Prepared]:
    """``n`` different model inputs (a disc on a varying background), with metadata."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:rows, 0:cols]
    out = []
    for i in range(n):
        img = np.empty((rows, cols, 3), np.uint8)
        img[:] = rng.integers(120, 230, 3)
        disc = (yy - rows / 2 - 4 * i) ** 2 + (xx - cols / 2 + 3 * i) ** 2 < (rows / (3 + i % 3)) ** 2
        img[disc] = rng.integers(20, 110, 3)
        out.append(Prepared(img, None, (rows, cols), {"age": 40.0 + i, "sex": "MF"[i % 2]}))
    return out


def _submit_together(batcher: MicroBatcher, prepared: list[Prepared]) -> list:
    results: list = [None] * len(prepared)
    start = threading.Barrier(len(prepared))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = batcher.classify(prepared[i])
        except BaseException as exc:  # noqa: BLE001 - checked by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prepared))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.mark.parametrize("n, max_batch", [(8, 4), (6, 3), (5, 1)])
def test_concurrent_images_share_model_calls_and_results_equal_unbatched(clf, n, max_batch):
    prepared = _prepared(n, *clf.input_size)
    with MicroBatcher(clf, max_batch=max_batch, max_wait=30.0) as batcher:
        results = _submit_together(batcher, prepared)
        calls, images = batcher.calls, batcher.images
    assert images == n
    assert calls <= -(-n // max_batch)  # ceil(n / max_batch): full batches go at once
    for p, got in zip(prepared, results):
        assert not isinstance(got, BaseException), got
        probs, cams = classify([p], clf)  # unbatched
        np.testing.assert_allclose(got[0], probs[0], atol=1e-6)
        assert np.abs(got[1] - cams[0]).max() < 1e-4
        assert int(np.argmax(got[0])) == int(np.argmax(probs[0]))


def test_a_lone_image_is_not_held_for_a_full_batch(clf):
    (p,) = _prepared(1, *clf.input_size)
    with MicroBatcher(clf, max_batch=16, max_wait=0.0) as batcher:
        probs, cam = batcher.classify(p)
        assert batcher.calls == 1
    assert probs.shape == (len(clf.card.classes),) and cam.shape == clf.input_size


def test_a_failing_batch_fails_every_image_in_it_and_the_batcher_goes_on(clf):
    good = _prepared(2, *clf.input_size)
    bad = Prepared(np.zeros((8, 8, 3), np.uint8), None, (8, 8), {})  # wrong size: predict raises
    with MicroBatcher(clf, max_batch=3, max_wait=30.0) as batcher:
        results = _submit_together(batcher, [*good, bad])
        assert all(isinstance(r, ValueError) for r in results)
        assert batcher.classify(good[0])[0].shape == (len(clf.card.classes),)


def test_a_stopped_batcher_refuses_work(clf):
    batcher = MicroBatcher(clf, max_batch=2, max_wait=0.01).start()
    batcher.stop()
    with pytest.raises(RuntimeError):
        batcher.classify(_prepared(1, *clf.input_size)[0])
    with pytest.raises(ValueError):
        MicroBatcher(clf, max_batch=0, max_wait=0.01)


def test_auto_settings():
    assert auto_max_batch("cuda", 0) == 16 and auto_max_batch("cpu", 0) == 1 and auto_max_batch("cpu", 4) == 4
    assert auto_inference_threads(1, 0, cores=2) == 1
    assert auto_inference_threads(2, 0, cores=2) == 1
    assert auto_inference_threads(3, 2, cores=2) == 1
    assert auto_inference_threads(1, 0, cores=6) == 3
    assert auto_inference_threads(4, 2, cores=16) == 4


def test_pool_stages_equal_in_thread_stages(clf, tmp_path):
    """Prepare and encode in a worker process give what they give in this thread."""
    source = make_source()
    path = tmp_path / "in.dcm"
    source.save_as(path, enforce_file_format=True)
    options = ProcessOptions()
    created = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
    local = Stages(clf.card, options, IDENTITY, pool_workers=0)
    pooled = Stages(clf.card, options, IDENTITY, pool_workers=1)
    try:
        times: dict = {}
        a = local.prepare(str(path))
        b = pooled.prepare(str(path), times=times)
        assert set(times) == {"decode", "frame", "segment"}
        assert np.array_equal(a.model_input, b.model_input) and a.crop == b.crop and a.metadata == b.metadata
        assert np.array_equal(a.segmentation.mask, b.segmentation.mask)
        from node.pipeline.process import assemble

        probs, cams = classify([a], clf)
        evidence = assemble(a, probs[0], cams[0], clf.card)
        assert local.encode(str(path), evidence, created) == pooled.encode(str(path), evidence, created)
        with pytest.raises(pydicom.errors.InvalidDicomError):  # errors cross the process boundary as they are
            bad = tmp_path / "bad.dcm"
            bad.write_bytes(b"not dicom")
            pooled.prepare(str(bad))
    finally:
        pooled.close()
    assert prepare(source, clf.card, options).segmentation is not None
