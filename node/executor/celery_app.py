"""The Celery application shared by the front end (``dermnode serve`` with ``executor.kind =
"celery"``) and the workers (``dermnode worker``). Light: no torch, no model.

Delivery guarantees come from the task options, set here once for both sides:

- ``acks_late`` + ``reject_on_worker_lost`` + ``worker_prefetch_multiplier = 1``: a message
  is acknowledged only after the task returned, so a worker killed mid-task (SIGKILL, OOM,
  power loss) leaves its message to be delivered again to another worker;
- JSON only (no pickle on a network service);
- ``task_track_started``: the front end can tell "running" from "not known".

With a Redis broker, an unacknowledged message comes back after the *visibility timeout*.
It can be set in the broker URL, which is the one place both sides read it::

    redis://redis:6379/0?visibility_timeout=300

(default :data:`DEFAULT_VISIBILITY_TIMEOUT`). The worker caps its send-retry countdowns at
half of it, so a retry waiting in a worker is never delivered twice. RabbitMQ (``amqp://``)
redelivers as soon as the dead worker's connection closes, and ignores this option.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from node.config import Settings

#: The one task: process one image and send its 4 outputs.
TASK_NAME = "dermnode.process"
QUEUES = ("cpu", "gpu")
#: Seconds before an unacknowledged Redis message is delivered again (Celery's default is 3600).
DEFAULT_VISIBILITY_TIMEOUT = 600.0
#: Query parameters of ``executor.broker_url`` that are ours (taken out before kombu sees the URL).
_URL_OPTIONS = {"visibility_timeout": float}


def durable_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename: a reader on shared storage sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class BrokerOptions:
    """``executor.broker_url`` split into the URL kombu gets and our options."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        kept, opts = [], {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _URL_OPTIONS:
                try:
                    opts[key] = _URL_OPTIONS[key](value)
                except ValueError:
                    raise ValueError(f"executor.broker_url: {key}={value!r} is not a number") from None
            else:
                kept.append((key, value))
        self.url = urlunsplit(parts._replace(query=urlencode(kept)))
        self.scheme = parts.scheme.lower()
        self.visibility_timeout = max(5.0, opts.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))

    @property
    def is_redis(self) -> bool:
        return self.scheme in ("redis", "rediss", "redis+socket")

    def transport_options(self) -> dict:
        if not self.is_redis:
            return {}
        vt = self.visibility_timeout
        return {
            "visibility_timeout": vt,
            # sweep for abandoned (unacked, older than vt) messages about 4 times per vt
            "unacked_restore_interval": max(1, min(10, int(vt / 4))),
            "unacked_restore_throttle": 1,
            # a broker that vanishes without closing TCP must not hang a publish forever
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
            "socket_keepalive": True,
        }

    @property
    def max_countdown(self) -> float:
        """Longest countdown a retry may wait inside a worker (unacked) without being redelivered."""
        return self.visibility_timeout / 2

    @property
    def lost_after(self) -> float:
        """How long the front end waits before calling a task nobody knows about lost."""
        return 2 * self.visibility_timeout + 60


def make_app(settings: Settings, *, name: str = "dermnode", fail_fast: bool = False):
    """A Celery app configured from ``[executor]``; tasks are registered by the worker only.

    ``fail_fast`` (the front end): connecting to the broker to publish gives up after a few
    seconds instead of retrying for ever, so the dispatcher can say the broker is down."""
    from celery import Celery

    ex = settings.executor
    broker = BrokerOptions(ex.broker_url)
    backend = ex.result_backend
    if fail_fast and urlsplit(backend).scheme.lower() in ("redis", "rediss"):
        backend = f"{__name__}:PollingRedisBackend+{backend}"
    app = Celery(name, broker=broker.url, backend=backend, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_default_queue=ex.queue,
        task_create_missing_queues=True,
        # results wait for a front end that may be stopped; jobs older than this are dead anyway
        result_expires=int(max(86400, settings.retry.max_age_hours * 3600)),
        broker_transport_options={
            **broker.transport_options(),
            **({"max_retries": 2, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 2.0}
               if fail_fast else {}),
        },
        broker_connection_retry_on_startup=True,
        redis_socket_timeout=30.0,
        redis_socket_connect_timeout=10.0,
        redis_retry_on_timeout=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # a pool process loads the model before its first task (seconds, more on a busy host)
        worker_proc_alive_timeout=300.0,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    app.dermnode_broker = broker  # type: ignore[attr-defined]
    return app


@functools.cache
def _polling_redis_backend():
    from celery.backends.base import BaseBackend
    from celery.backends.redis import RedisBackend

    class PollingRedisBackend(RedisBackend):
        """The front end's result backend: it polls (MGET) and never waits on a result, so it
        does not subscribe to a pub/sub channel per published task (which Celery's Redis
        backend does by default, and retries for ever when Redis is down)."""

        def on_task_call(self, producer, task_id):
            pass

        def forget(self, task_id):
            BaseBackend.forget(self, task_id)

    return PollingRedisBackend


def __getattr__(name: str):  # the backend class, imported by Celery as "node.executor.celery_app:PollingRedisBackend"
    if name == "PollingRedisBackend":
        return _polling_redis_backend()
    raise AttributeError(name)


def queue_depths(settings: Settings, queues: tuple[str, ...] = QUEUES) -> dict[str, int]:
    """Messages waiting in each Celery queue (Redis LLEN; AMQP passive declare). A queue
    that does not exist yet counts 0. Raises when the broker cannot be reached."""
    broker = BrokerOptions(settings.executor.broker_url)
    if broker.is_redis:
        import redis

        client = redis.Redis.from_url(broker.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            pipe = client.pipeline()
            for q in queues:
                pipe.llen(q)
            return {q: int(n) for q, n in zip(queues, pipe.execute())}
        finally:
            client.close()
    from kombu import Connection

    out: dict[str, int] = {}
    with Connection(broker.url, connect_timeout=2) as conn:
        for q in queues:
            channel = conn.channel()  # a failed passive declare closes its channel: one per queue
            try:
                _, count, _ = channel.queue_declare(q, passive=True)
            except conn.channel_errors:
                count = 0
            finally:
                try:
                    channel.close()
                except Exception:  # noqa: BLE001
                    pass
            out[q] = int(count)
    return out


class QueueDepthCollector:
    """Prometheus collector: ``dermnode_celery_queue_depth{queue=...}`` read at scrape time.
    Register with ``metrics.registry.register(QueueDepthCollector(settings))``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("dermnode_celery_queue_depth", "Messages waiting in the Celery queue", labels=["queue"])
        up = GaugeMetricFamily("dermnode_broker_up", "1 when the Celery broker answered the last scrape")
        try:
            depths = queue_depths(self.settings)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the broker is down
            up.add_metric([], 0)
            yield up
            return
        for q, n in depths.items():
            g.add_metric([q], n)
        up.add_metric([], 1)
        yield g
        yield up
