"""``dermnode serve``: wires the stages together and runs them until SIGTERM/SIGINT.

receive (network.scp) -> journal (intake) -> process (executor) -> send (outbox)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from node.config import Settings
from node.evidence.identity import NodeIdentity
from node.executor.remote import RemoteModel, make_executor, recover
from node.intake.intake import Intake
from node.intake.journal import Journal
from node.intake.spool import Spool
from node.model.classifier import Classifier
from node.network.scp import AccessPolicy, build_ae, make_handlers
from node.network.tls import server_context
from node.network.scu import Sender
from node.ops.health import CachedCheck, HealthServer, check_writable
from node.ops.metrics import Metrics
from node.network.scu import Destination
from node.network.sopclasses import OUTPUT_ONLY_CLASSES
from node.outbox import Outbox
from node.pipeline.decode import check_header

log = logging.getLogger("dermnode.serve")


def model_key(classifier: Classifier) -> str:
    return f"{classifier.card.model.name}:{classifier.card.model.version}"


class Node:
    def __init__(self, settings: Settings, classifier: Classifier | None = None) -> None:
        self.settings = s = settings
        if classifier is None:
            # A Celery front end reads only the card: the workers load the model.
            classifier = (RemoteModel(s) if s.executor.kind == "celery"
                          else Classifier.load(s.model.resolved_path(), device=s.model.device))
        self.classifier = classifier
        self.identity = NodeIdentity()
        storage = Path(s.storage.dir)
        self.spool = Spool(storage)
        self.journal = Journal(storage / "journal.sqlite")
        recovered = recover(s, self.journal)
        if recovered:
            log.warning("recovered %d job(s) interrupted by a previous stop", recovered)
        self.metrics = Metrics(self.journal)
        self.outbox = Outbox(
            journal=self.journal,
            spool=self.spool,
            destination=Destination(
                ae_title=s.destination.ae_title,
                host=s.destination.host,
                port=s.destination.port,
                calling_ae_title=s.node.ae_title,
                timeout=s.destination.timeout,
                tls=s.destination.tls,
                tls_ca=s.destination.tls_ca,
                tls_cert=s.destination.tls_cert,
                tls_key=s.destination.tls_key,
            ),
            sop_classes=[*s.node.sop_classes, *OUTPUT_ONLY_CLASSES],
            initial_delay=s.retry.initial_delay,
            max_delay=s.retry.max_delay,
            max_age=s.retry.max_age_hours * 3600,
            retention=s.storage.retention_hours * 3600,
            on_event=self.metrics.outbox_event,
        )
        self.executor = make_executor(
            s,
            journal=self.journal,
            spool=self.spool,
            classifier_loader=lambda: self.classifier,
            identity=self.identity,
            metrics=self.metrics,
            on_encoded=self.outbox.wake,
        )
        if s.executor.kind == "celery":
            from node.executor.celery_app import QueueDepthCollector

            self.metrics.registry.register(QueueDepthCollector(s))
        self.intake = Intake(
            spool=self.spool,
            journal=self.journal,
            identity=self.identity,
            model_key=model_key(self.classifier),
            accepted_classes=s.node.sop_classes,
            min_free_bytes=s.storage.min_free_mb * 2**20,
            max_queue=s.storage.max_queue,
            header_check=lambda ds: check_header(ds, s.limits.max_pixels),
            resend_duplicates=s.processing.resend_duplicates,
            on_job=self.executor.submit,
            observe=self.metrics.intake,
        )
        self.ae = build_ae(
            ae_title=s.node.ae_title,
            input_classes=s.node.sop_classes,
            max_associations=s.limits.max_associations,
            max_pdu=s.limits.max_pdu,
            acse_timeout=s.limits.acse_timeout,
            dimse_timeout=s.limits.dimse_timeout,
            network_timeout=s.limits.network_timeout,
        )
        self.policy = AccessPolicy(s.node.allowed_calling_aets, s.node.calling_aet_hosts)
        self.ssl_context = (
            server_context(s.tls.cert, s.tls.key, s.tls.ca, s.tls.require_client_cert) if s.tls.enabled else None
        )
        self._server = None
        self._http: HealthServer | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        s = self.settings
        if s.executor.kind == "local":
            # Warm the model before taking work: the first real image is not slowed by lazy
            # initialisation, and a crash-restart loop does not keep killing the same job.
            import numpy as np

            rows, cols = self.classifier.card.input.size
            self.classifier.predict(np.zeros((1, rows, cols, 3), np.uint8))
        self.executor.start()
        self.outbox.start()
        self._server = self.ae.start_server(
            (s.node.bind, s.node.port),
            block=False,
            evt_handlers=make_handlers(
                self.intake,
                on_association=self.metrics.association,
                policy=self.policy,
                max_dataset_bytes=s.limits.max_dataset_mb * 2**20,
                tls=self.ssl_context is not None,
            ),
            ssl_context=self.ssl_context,
        )
        if s.http.port:
            self._http = HealthServer(
                s.http.bind, s.http.port,
                liveness=self.liveness, readiness=CachedCheck(self.readiness), metrics=self.metrics.render,
            )
            self._http.start()
            log.info("HTTP /healthz /readyz /metrics on %s:%d", s.http.bind, self._http.port)
        card = self.classifier.card
        log.info(
            "dermnode %s listening on %s:%d%s; model %s %s (%s) on %s; destination %s@%s:%d",
            s.node.ae_title, s.node.bind, s.node.port, " (DICOM TLS)" if self.ssl_context else "", card.model.name, card.model.version, card.label,
            self.classifier.device, s.destination.ae_title, s.destination.host, s.destination.port,
        )
        if not s.node.allowed_calling_aets:
            log.warning("node.allowed_calling_aets is empty: any calling AE title is accepted")

    def stop(self) -> None:
        """Graceful stop: refuse new associations, finish jobs in hand, leave the rest journaled."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping: no new associations; finishing jobs in progress")
        if self._server is not None:
            self._server.shutdown()
        if self._http is not None:
            self._http.stop()
        self.executor.stop()
        self.outbox.stop()
        self.journal.close()
        log.info("stopped")

    def liveness(self) -> dict:
        """The node can still take data: journal and spool writable, workers alive."""
        self.journal.check_writable()
        check_writable(self.spool.tmp)
        workers = sum(t.is_alive() for t in self.executor._threads)  # noqa: SLF001
        ok = workers == self.executor.n
        return {"ok": ok, "journal": "writable", "spool": "writable", "workers_alive": workers}

    def readiness(self) -> dict:
        """Model loaded and destination answering C-ECHO."""
        s = self.settings
        sender = Sender(self.outbox.destination, [])
        try:
            status = sender.echo()
            reachable = status == 0
            detail = f"C-ECHO status 0x{status:04X}"
        except Exception as exc:  # noqa: BLE001
            reachable, detail = False, str(exc)
        card = self.classifier.card
        extra = self.executor.readiness() if hasattr(self.executor, "readiness") else {}
        return {
            **extra,
            "ok": reachable and extra.get("broker_reachable", True),
            "model": f"{card.model.name} {card.model.version}",
            "destination": f"{s.destination.ae_title}@{s.destination.host}:{s.destination.port}",
            "destination_reachable": reachable,
            "detail": detail,
        }

    def run_forever(self) -> None:
        self.start()
        done = threading.Event()

        def _sig(signum, frame):  # noqa: ARG001
            log.info("received signal %d", signum)
            done.set()

        signal.signal(signal.SIGTERM, _sig)
        signal.signal(signal.SIGINT, _sig)
        while not done.is_set():
            done.wait(1.0)
        self.stop()
