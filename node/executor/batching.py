"""Micro-batching of the model call across concurrent jobs (the GPU path).

Worker threads each hold one prepared image; :meth:`MicroBatcher.classify`
hands it to one batching thread, which waits at most ``max_wait`` seconds after
the first image of a batch for more (up to ``max_batch``) and runs one
``classifier.predict`` for all of them. A full batch goes at once; a lone image
waits ``max_wait`` at most, so light-load latency stays bounded.

The classifier's batch dimension is independent (eval mode), so an image gets
the same probabilities and Grad-CAM, up to float rounding, whatever batch it
shares (tests/unit/test_batching.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from node.pipeline.process import Prepared, classify

log = logging.getLogger("dermnode.batching")


@dataclass
class _Request:
    prepared: Prepared
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[np.ndarray, np.ndarray] | None = None
    error: BaseException | None = None


class MicroBatcher:
    """One model call for the images that arrive within ``max_wait`` of each other."""

    def __init__(self, classifier, *, max_batch: int, max_wait: float) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: list[_Request] = []
        self._cv = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        #: Model calls made and images classified so far (metrics, tests).
        self.calls = 0
        self.images = 0

    def start(self) -> MicroBatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dermnode-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> MicroBatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def classify(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, cam) of one image; blocks until its batch has run."""
        request = _Request(prepared)
        with self._cv:
            if self._stopped:
                raise RuntimeError("the batcher is stopped")
            self._queue.append(request)
            self._cv.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _next_batch(self) -> list[_Request] | None:
        with self._cv:
            while not self._queue:
                if self._stopped:
                    return None
                self._cv.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self._queue) < self.max_batch and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                probs, cams = classify([r.prepared for r in batch], self.classifier)
                for i, r in enumerate(batch):
                    r.result = (probs[i], cams[i])
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting job
                for r in batch:
                    r.error = exc
            finally:
                self.calls += 1
                self.images += len(batch)
                for r in batch:
                    r.done.set()
