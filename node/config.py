"""Node configuration: TOML tables validated by pydantic, overridable by environment.

Precedence (highest first): ``DERMNODE_<TABLE>__<KEY>`` environment variables,
the TOML file given with ``--config``, then the embedded defaults below (the
defaults are the same values as ``config/node.toml``). Unknown keys are an
error. A bad value fails at start-up with :class:`ConfigError`, whose message
names the setting (``table.key``) and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DERMOSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"

#: The repository (or installed tree) root: where the shipped ``models/`` lives.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "models/derm-effnetlite0-ham7"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the setting."""


def _ae_title(v: str) -> str:
    if not (1 <= len(v) <= 16) or v != v.strip() or "\\" in v or not v.isascii() or not v.isprintable():
        raise ValueError(f"AE title must be 1-16 printable ASCII characters without backslash or padding, got {v!r}")
    return v


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NodeTable(_Table):
    ae_title: str = "DERMNODE"
    bind: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    #: Calling AE titles allowed to associate; empty = accept any (insecure, documented).
    allowed_calling_aets: list[str] = []
    #: Optional binding of allowed calling AE titles to source hosts: {"ORTHANC" = ["10.0.0.5"]}.
    #: Host names are resolved at start-up. An AE title listed here is accepted only from these.
    calling_aet_hosts: dict[str, list[str]] = {}
    #: Storage SOP classes accepted as input for processing.
    sop_classes: list[str] = [DERMOSCOPIC, VL_PHOTOGRAPHIC]

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, v: list[str]) -> list[str]:
        return [_ae_title(x) for x in v]

    @field_validator("sop_classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one SOP class is needed")
        for uid in v:
            if not uid or not set(uid) <= set("0123456789.") or len(uid) > 64:
                raise ValueError(f"not a UID: {uid!r}")
        return v


class DestinationTable(_Table):
    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = Field(default=4242, ge=1, le=65535)
    #: Seconds to wait for association, DIMSE responses and network reads.
    timeout: float = Field(default=30.0, gt=0)
    #: Send over DICOM TLS (BCP 195): verify the destination's certificate against tls_ca.
    tls: bool = False
    tls_ca: str = ""
    #: Client certificate and key, for destinations that require mutual TLS.
    tls_cert: str = ""
    tls_key: str = ""

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


class StorageTable(_Table):
    #: Spool and journal directory; must be on a durable local disk.
    dir: Path = Path("var/dermnode")
    #: Refuse new images (0xA700) when free space on the storage disk falls below this (MiB).
    min_free_mb: int = Field(default=512, ge=0)
    #: Refuse new images (0xA700) when this many jobs are waiting.
    max_queue: int = Field(default=10000, ge=1)
    #: Hours to keep the spooled input and outputs of a delivered job (0 = delete at once).
    #: Dead jobs keep their files until an operator acts.
    retention_hours: float = Field(default=24.0, ge=0)


class ModelTable(_Table):
    path: Path = Path(DEFAULT_MODEL)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def resolved_path(self) -> Path:
        """Relative paths are tried against the working directory, then the install root."""
        if self.path.is_absolute() or self.path.exists():
            return self.path
        alt = PACKAGE_ROOT / self.path
        return alt if alt.exists() else self.path


class ProcessingTable(_Table):
    #: Worker threads running the pipeline (in-process executor).
    workers: int = Field(default=1, ge=1, le=64)
    #: Re-send the stored outputs when an already processed image arrives again.
    resend_duplicates: bool = False
    #: Worker processes for decode/prepare and encode (0 = in the worker threads).
    pool_workers: int = Field(default=0, ge=0, le=64)
    #: Largest model batch across concurrent jobs (0 = auto: 16 on CUDA, 1 = no batching on CPU).
    max_batch: int = Field(default=0, ge=0, le=256)
    #: Milliseconds a batch waits for more images after its first one.
    batch_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    #: Torch CPU threads for the model (0 = auto: half the cores the other stages leave free, 1-4).
    inference_threads: int = Field(default=0, ge=0, le=256)


class LimitsTable(_Table):
    max_associations: int = Field(default=10, ge=1, le=1000)
    #: Maximum PDU size we receive (bytes).
    max_pdu: int = Field(default=262144, ge=4096, le=2**31)
    #: Largest dataset accepted (MiB); larger C-STOREs are refused with 0xC000.
    max_dataset_mb: int = Field(default=512, ge=1)
    #: Largest image accepted, in pixels (Rows x Columns), checked from the header before decoding.
    max_pixels: int = Field(default=60_000_000, ge=1)
    #: Seconds: association negotiation, waiting for a DIMSE message, idle network.
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)


class TlsTable(_Table):
    #: Listen with DICOM TLS (BCP 195, TLS 1.2 minimum) instead of plain TCP.
    enabled: bool = False
    #: Server certificate chain and private key (PEM).
    cert: str = ""
    key: str = ""
    #: CA bundle (PEM) that client certificates must chain to.
    ca: str = ""
    #: Mutual TLS: refuse clients without a certificate signed by ``ca``.
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files(self):
        if self.enabled:
            for name in ("cert", "key") + (("ca",) if self.require_client_cert else ()):
                value = getattr(self, name)
                if not value:
                    raise ValueError(f"tls.{name} is required when tls.enabled is true")
                if not Path(value).is_file():
                    raise ValueError(f"tls.{name}: file not found: {value}")
        return self


class RetryTable(_Table):
    #: First retry delay after a transient send failure (seconds); doubles each time.
    initial_delay: float = Field(default=5.0, gt=0)
    max_delay: float = Field(default=3600.0, gt=0)
    #: Give up (dead-letter) when a job has not been delivered this many hours after receipt.
    max_age_hours: float = Field(default=72.0, gt=0)
    #: Processing attempts before a job that keeps failing is dead-lettered (poison job).
    max_attempts: int = Field(default=3, ge=1)


class ExecutorTable(_Table):
    #: "local": worker threads in this process (embedded default, no other services).
    #: "celery": jobs go to Celery workers (``dermnode worker``) through a broker.
    kind: Literal["local", "celery"] = "local"
    #: Celery broker and result backend, e.g. "redis://127.0.0.1:6379/0" (or "amqp://..." for RabbitMQ).
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = "redis://127.0.0.1:6379/1"
    #: Queue a front end sends to, and a worker takes from: "cpu" or "gpu".
    queue: Literal["cpu", "gpu"] = "cpu"
    #: Directory shared by front ends and workers (NFS etc.): jobs carry a path, not the bytes.
    #: "" = the task message carries the spooled dataset bytes.
    shared_storage: str = ""


class HttpTable(_Table):
    #: 0 disables the HTTP endpoint; otherwise serves /healthz /readyz /metrics.
    port: int = Field(default=0, ge=0, le=65535)
    bind: str = "127.0.0.1"


class LoggingTable(_Table):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    #: Also write the audit log (one line per association) to this file; "" = only the main log.
    audit_file: str = ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DERMNODE_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    node: NodeTable = NodeTable()
    destination: DestinationTable = DestinationTable()
    storage: StorageTable = StorageTable()
    model: ModelTable = ModelTable()
    processing: ProcessingTable = ProcessingTable()
    limits: LimitsTable = LimitsTable()
    tls: TlsTable = TlsTable()
    retry: RetryTable = RetryTable()
    executor: ExecutorTable = ExecutorTable()
    http: HttpTable = HttpTable()
    logging: LoggingTable = LoggingTable()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [env_settings]
        toml = _TOML_FILE.get()
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml, deep_merge=True))
        sources.append(init_settings)
        return tuple(sources)


class _TomlPath:
    """Which TOML file the next Settings() reads (pydantic-settings needs it at class level)."""

    def __init__(self) -> None:
        self._path: Path | None = None

    def get(self) -> Path | None:
        return self._path

    def set(self, p: Path | None) -> None:
        self._path = p


_TOML_FILE = _TomlPath()


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Load settings from an optional TOML file plus ``DERMNODE_*`` environment variables.

    Raises :class:`ConfigError` naming each bad setting.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        import tomllib

        try:
            tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from exc
    old_env = None
    if env is not None:
        old_env = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
    _TOML_FILE.set(Path(path) if path is not None else None)
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e["loc"]) or "(top level)"
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown setting"
            problems.append(f"{where}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else f"{where}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    finally:
        _TOML_FILE.set(None)
        if old_env is not None:
            os.environ.clear()
            os.environ.update(old_env)
