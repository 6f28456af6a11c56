"""Configuration: read once at start, validated into a frozen typed object.

The defaults below are the embedded defaults; ``config.toml`` at the top of
the repository documents them and a test keeps the two identical. A bad value
raises :class:`ConfigError` naming the key, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from daemon.exceptions import ConfigError
from daemon.retry import RetryPolicy

ENV_CONFIG = "OPACITYD_CONFIG"
ENV_STATE_DIR = "OPACITYD_STATE_DIR"
ENV_MODEL = "OPACITYD_MODEL"
MAX_THREADS = 256
"""Largest thread count a [worker] key accepts (more is a typo, not a host)."""

IneligiblePolicy = Literal["keep", "discard"]
UnknownPolicy = Literal["accept", "reject"]
DuplicatePolicy = Literal["keep_first", "replace_and_rescore"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class PathsConfig:
    state_dir: str = "state"
    """Relative paths are resolved against the config file's folder."""


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = ""
    """Empty: a SQLite file ``opacityd.sqlite3`` in the state folder."""
    busy_timeout_ms: int = 10_000


@dataclass(frozen=True)
class PeerConfig:
    ae_title: str = "*"
    addresses: tuple[str, ...] = ()
    """CIDR networks the peer may connect from; empty means any address."""


@dataclass(frozen=True)
class TLSConfig:
    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    require_client_certificate: bool = True


@dataclass(frozen=True)
class ReceiverConfig:
    ae_title: str = "OPACITYD"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 10
    processes: int = 1
    """Receiver processes accepting on the one port (SO_REUSEPORT; Linux spreads the connections
    over them). ``serve`` runs one receiver itself and supervises ``processes - 1`` more; the
    association and connection limits apply to each process."""
    max_pdu_size: int = 262_144
    """The largest P-DATA PDU we accept (advertised in the A-ASSOCIATE-AC); a larger one aborts."""
    max_association_request_size: int = 65_536
    """The largest PDU accepted before association (an A-ASSOCIATE-RQ is a few KB) and the
    largest non-P-DATA PDU after it."""
    association_request_timeout_s: float = 10.0
    """A new connection must deliver its whole A-ASSOCIATE-RQ (TLS handshake included) within this."""
    pdu_read_timeout_s: float = 30.0
    """Once a PDU has started to arrive, all of it must arrive within this."""
    max_pending_connections: int = 32
    """Connections not yet associated, counted apart from max_associations; when full, the
    oldest is closed to make room."""
    max_connections_per_address: int = 8
    """Concurrent connections (pending and associated) from one source address."""
    max_dataset_size_mb: int = 512
    """The largest data set one C-STORE may carry; a larger one aborts the association."""
    slots_exhausted_unready_s: float = 30.0
    """/readyz fails once every association slot (or pending slot) has been taken this long."""
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    shutdown_grace_s: float = 30.0
    min_free_disk_mb: int = 512
    """Below this much free space in the spool's file system, C-STORE answers 0xA700."""
    accept_any_storage_class: bool = False
    extra_sop_classes: tuple[str, ...] = ()
    ineligible_instances: IneligiblePolicy = "keep"
    duplicate_policy: DuplicatePolicy = "keep_first"
    """A re-sent SOP Instance UID with other bytes: keep the first copy (as Orthanc does) or
    keep the new version beside it and score the study again (docs/conformance.md)."""
    peers: tuple[PeerConfig, ...] = (
        PeerConfig(ae_title="*", addresses=("127.0.0.0/8", "::1/128")),
    )
    tls: TLSConfig = TLSConfig()


@dataclass(frozen=True)
class EligibilityConfig:
    modalities: tuple[str, ...] = ("CR", "DX")
    body_parts: tuple[str, ...] = ("CHEST", "THORAX", "LUNG", "PORT CHEST")
    chest_keywords: tuple[str, ...] = ("chest", "thorax", "thx", "lung", "cxr", "torax", "tórax")
    unknown_body_part: UnknownPolicy = "accept"
    frontal_views: tuple[str, ...] = ("PA", "AP")
    lateral_views: tuple[str, ...] = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD")
    unknown_view: UnknownPolicy = "accept"


@dataclass(frozen=True)
class SchedulerConfig:
    study_quiet_period_s: float = 5.0
    check_interval_s: float = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    embedded: bool = True
    """`opacityd serve` starts (and restarts) one `opacityd worker` process."""
    batch_size: int = 8
    threads: int = 2
    """Preprocessing threads; decoding overlaps inference."""
    inference_threads: int = 0
    """Threads one network operation is split over (the backend's intra-op pool); 0: one per
    CPU (``os.cpu_count()``). Under JAX only 1 (single-threaded XLA) or one per CPU exist."""
    inference_inter_op_threads: int = 0
    """Network operations run side by side (inter-op pool; TensorFlow, PyTorch); 0: the
    backend's default."""
    poll_interval_s: float = 0.5
    lease_s: float = 300.0
    max_attempts: int = 5
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    restart_base_s: float = 1.0
    """The supervisor in `serve` restarts a dead worker after this, doubling per quick death."""
    restart_max_s: float = 60.0

    @property
    def retry(self) -> RetryPolicy:
        """How failed jobs are retried (and when a job ends failed)."""
        return RetryPolicy(self.retry_base_s, self.retry_max_s, self.max_attempts)

    @property
    def restart(self) -> RetryPolicy:
        """How the supervisor waits between restarts of a dying worker (never gives up)."""
        return RetryPolicy(self.restart_base_s, self.restart_max_s, max_attempts=2**31 - 1)


@dataclass(frozen=True)
class DeliveryConfig:
    enabled: bool = True
    """False: shadow mode. Everything is scored and recorded, nothing is sent."""
    poll_interval_s: float = 1.0
    max_attempts: int = 10
    retry_base_s: float = 5.0
    retry_max_s: float = 600.0
    timeout_s: float = 30.0

    @property
    def retry(self) -> RetryPolicy:
        """How failed deliveries are retried (and when one ends failed)."""
        return RetryPolicy(self.retry_base_s, self.retry_max_s, self.max_attempts)


@dataclass(frozen=True)
class DestinationConfig:
    name: str = ""
    host: str = ""
    port: int = 104
    called_ae: str = ""
    calling_ae: str = "OPACITYD"
    enabled: bool = True
    send: tuple[str, ...] = ("sr", "summary")
    """Which objects of each result this destination gets: ``sr`` (the Structured Report)
    and/or ``summary`` (the summary Secondary Capture); one delivery each."""
    tls: TLSConfig = TLSConfig(require_client_certificate=False)


DESTINATION_OBJECTS = ("sr", "summary")
"""What a ``[[destinations]]`` entry may list in ``send``."""


@dataclass(frozen=True)
class SummaryConfig:
    enabled: bool = True
    """Make a summary image (Grad-CAM heatmap over the scored radiograph, the result as burned-in
    text) and the worklist's preview PNGs for every result. Off: neither is made, and no
    destination gets a summary."""


HL7_VERSIONS = ("2.5", "2.5.1", "2.6", "2.7")
"""HL7 v2 versions an ORU^R01 is built in (tests build one in each): those hl7apy knows with
the CWE data type and ORC directly in the order observation group (2.8 moves it)."""


@dataclass(frozen=True)
class HL7DestinationConfig:
    """A RIS (or interface engine) that takes HL7 v2 ORU^R01 results over MLLP."""

    name: str = ""
    host: str = ""
    port: int = 2575
    sending_application: str = "OPACITYD"
    """MSH-3; with the facilities below, as the RIS's interface was set up."""
    sending_facility: str = ""
    """MSH-4."""
    receiving_application: str = ""
    """MSH-5."""
    receiving_facility: str = ""
    """MSH-6."""
    version: str = "2.5.1"
    """MSH-12: one of HL7_VERSIONS."""
    enabled: bool = True
    tls: TLSConfig = TLSConfig(require_client_certificate=False)


@dataclass(frozen=True)
class ModelConfig:
    bundle: str = ""
    """Path of the model bundle directory; ``$OPACITYD_MODEL`` overrides it."""
    decision_threshold: float = -1.0
    """Overrides of the bundle manifest's thresholds; -1 keeps the bundle's value."""
    urgent_threshold: float = -1.0
    elevated_threshold: float = -1.0


@dataclass(frozen=True)
class WorklistConfig:
    show_identifiers: bool = False
    """Show study UID and accession number in `opacityd worklist` and the HTTP API."""


@dataclass(frozen=True)
class HTTPConfig:
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = 8642
    token: str = ""
    """Bearer token for every request; required when bind_address is not loopback."""
    token_file: str = ""
    """A file holding the token (a systemd credential named http-token is used too)."""


@dataclass(frozen=True)
class RetentionConfig:
    enabled: bool = True
    delivered_hours: float = 24.0
    """Spooled images are deleted this long after their study's SR was delivered everywhere."""
    ineligible_hours: float = 1.0
    """Ineligible images (kept for audit) are deleted this long after their study closed."""
    check_interval_s: float = 300.0


@dataclass(frozen=True)
class LoggingConfig:
    level: LogLevel = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = PathsConfig()
    database: DatabaseConfig = DatabaseConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    eligibility: EligibilityConfig = EligibilityConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    model: ModelConfig = ModelConfig()
    worker: WorkerConfig = WorkerConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    destinations: tuple[DestinationConfig, ...] = ()
    hl7_destinations: tuple[HL7DestinationConfig, ...] = ()
    summary: SummaryConfig = SummaryConfig()
    worklist: WorklistConfig = WorklistConfig()
    http: HTTPConfig = HTTPConfig()
    retention: RetentionConfig = RetentionConfig()
    logging: LoggingConfig = LoggingConfig()
    source: str = field(default="<embedded defaults>", compare=False)

    @property
    def state_dir(self) -> Path:
        return Path(self.paths.state_dir)

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.state_dir / 'opacityd.sqlite3'}"


def load_config(path: str | Path | None = None, env: typing.Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration.

    ``path`` wins over ``$OPACITYD_CONFIG``; with neither, the embedded
    defaults are used. ``$OPACITYD_STATE_DIR`` overrides ``paths.state_dir``
    and ``$OPACITYD_MODEL`` overrides ``model.bundle``; relative paths in the
    file are resolved against its folder, those in the environment against
    the working folder.
    Returns a frozen :class:`Config`; raises :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    chosen = path if path is not None else env.get(ENV_CONFIG) or None
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    source = "<embedded defaults>"
    if chosen is not None:
        cfg_path = Path(chosen)
        try:
            with cfg_path.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {cfg_path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {cfg_path} is not valid TOML: {e}") from e
        base_dir = cfg_path.resolve().parent
        source = str(cfg_path)
    config = _build(Config, raw, "")
    state_dir = env.get(ENV_STATE_DIR) or config.paths.state_dir
    state_path = Path(state_dir)
    if not state_path.is_absolute():
        state_path = base_dir / state_path
    bundle = env.get(ENV_MODEL) or config.model.bundle
    if bundle and not Path(bundle).is_absolute():
        bundle = str((base_dir if not env.get(ENV_MODEL) else Path.cwd()) / bundle)
    token = config.http.token
    credentials = env.get("CREDENTIALS_DIRECTORY")
    token_file = config.http.token_file or (
        str(Path(credentials) / "http-token") if credentials and (Path(credentials) / "http-token").is_file()
        else "")
    if token_file and not token:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"http.token_file = {token_file!r}: cannot read it ({e.strerror})") from e
    config = dataclasses.replace(
        config, paths=PathsConfig(state_dir=str(state_path)),
        model=dataclasses.replace(config.model, bundle=bundle),
        http=dataclasses.replace(config.http, token=token), source=source,
    )
    _check_semantics(config)
    return config


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or '<top>'} = {raw!r}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key; accepted keys here: {', '.join(sorted(names))}")
    values = {name: _convert(hints[name], raw[name], f"{prefix}{name}") for name in raw}
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        return tuple(_convert(item_hint, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported schema type {hint}")


def _require(ok: bool, key: str, value: Any, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {accepted}")


def valid_ae_title(title: str) -> bool:
    """True when ``title`` is a legal DICOM AE title (1-16 chars, no backslash/controls)."""
    stripped = title.strip()
    return (
        0 < len(stripped) <= 16
        and all(32 <= ord(c) < 127 for c in title)
        and "\\" not in title
    )


def _check_semantics(config: Config) -> None:
    r = config.receiver
    _require(valid_ae_title(r.ae_title), "receiver.ae_title", r.ae_title,
             "1 to 16 printable ASCII characters without backslash")
    _require(1 <= r.port <= 65535, "receiver.port", r.port, "an integer from 1 to 65535")
    try:
        ipaddress.ip_address(r.bind_address)
    except ValueError:
        _require(False, "receiver.bind_address", r.bind_address, "an IPv4 or IPv6 address")
    _require(r.max_associations >= 1, "receiver.max_associations", r.max_associations,
             "an integer >= 1")
    _require(1 <= r.processes <= 64, "receiver.processes", r.processes, "an integer from 1 to 64")
    _require(4096 <= r.max_pdu_size <= 16 * 2**20, "receiver.max_pdu_size", r.max_pdu_size,
             "an integer from 4096 to 16777216 (0, unlimited, is no longer accepted)")
    _require(4096 <= r.max_association_request_size <= 2**20,
             "receiver.max_association_request_size", r.max_association_request_size,
             "an integer from 4096 to 1048576")
    for name in ("max_pending_connections", "max_connections_per_address", "max_dataset_size_mb"):
        _require(getattr(r, name) >= 1, f"receiver.{name}", getattr(r, name), "an integer >= 1")
    for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s", "shutdown_grace_s",
                 "association_request_timeout_s", "pdu_read_timeout_s",
                 "slots_exhausted_unready_s"):
        value = getattr(r, name)
        _require(value > 0, f"receiver.{name}", value, "a number of seconds > 0")
    for i, uid in enumerate(r.extra_sop_classes):
        _require(_is_uid(uid), f"receiver.extra_sop_classes[{i}]", uid, "a DICOM UID")
    _require(len(r.peers) > 0, "receiver.peers", [], "at least one [[receiver.peers]] entry")
    for i, peer in enumerate(r.peers):
        _require(peer.ae_title == "*" or valid_ae_title(peer.ae_title),
                 f"receiver.peers[{i}].ae_title", peer.ae_title, "'*' or a DICOM AE title")
        for j, net in enumerate(peer.addresses):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                _require(False, f"receiver.peers[{i}].addresses[{j}]", net,
                         "an IP address or CIDR network such as 10.0.0.0/8")
    if r.tls.enabled:
        for name in ("certificate", "private_key"):
            value = getattr(r.tls, name)
            _require(bool(value) and Path(value).is_file(), f"receiver.tls.{name}", value,
                     "the path of an existing PEM file when TLS is enabled")
        if r.tls.require_client_certificate:
            _require(bool(r.tls.ca_certificates) and Path(r.tls.ca_certificates).is_file(),
                     "receiver.tls.ca_certificates", r.tls.ca_certificates,
                     "an existing PEM file when client certificates are required")
    w = config.worker
    for name in ("batch_size", "threads", "max_attempts"):
        _require(getattr(w, name) >= 1, f"worker.{name}", getattr(w, name), "an integer >= 1")
    for name in ("inference_threads", "inference_inter_op_threads"):
        _require(0 <= getattr(w, name) <= MAX_THREADS, f"worker.{name}", getattr(w, name),
                 f"an integer from 0 (the backend's default, one per CPU: {os.cpu_count()} "
                 f"here) to {MAX_THREADS}")
    _require(w.threads <= MAX_THREADS, "worker.threads", w.threads,
             f"an integer from 1 to {MAX_THREADS}")
    for name in ("poll_interval_s", "lease_s", "retry_base_s", "restart_base_s"):
        _require(getattr(w, name) > 0, f"worker.{name}", getattr(w, name), "a number > 0")
    _require(w.retry_max_s >= w.retry_base_s, "worker.retry_max_s", w.retry_max_s,
             f"a number >= worker.retry_base_s ({w.retry_base_s})")
    _require(w.restart_max_s >= w.restart_base_s, "worker.restart_max_s", w.restart_max_s,
             f"a number >= worker.restart_base_s ({w.restart_base_s})")
    d = config.delivery
    _require(d.max_attempts >= 1, "delivery.max_attempts", d.max_attempts, "an integer >= 1")
    for name in ("poll_interval_s", "retry_base_s", "retry_max_s", "timeout_s"):
        _require(getattr(d, name) > 0, f"delivery.{name}", getattr(d, name), "a number > 0")
    _require(d.retry_max_s >= d.retry_base_s, "delivery.retry_max_s", d.retry_max_s,
             f"a number >= delivery.retry_base_s ({d.retry_base_s})")
    names = [dest.name for dest in config.destinations]
    for i, dest in enumerate(config.destinations):
        key = f"destinations[{i}]"
        _require(bool(dest.name) and names.count(dest.name) == 1, f"{key}.name", dest.name,
                 "a unique, non-empty name")
        _require(bool(dest.host), f"{key}.host", dest.host, "a host name or address")
        _require(1 <= dest.port <= 65535, f"{key}.port", dest.port, "an integer from 1 to 65535")
        for field_name in ("called_ae", "calling_ae"):
            value = getattr(dest, field_name)
            _require(valid_ae_title(value), f"{key}.{field_name}", value, "a DICOM AE title")
        _require(bool(dest.send) and len(set(dest.send)) == len(dest.send)
                 and set(dest.send) <= set(DESTINATION_OBJECTS), f"{key}.send", list(dest.send),
                 f"a non-empty list of distinct values from {list(DESTINATION_OBJECTS)}")
    _check_hl7_destinations(config.hl7_destinations)
    s = config.scheduler
    _require(s.study_quiet_period_s > 0, "scheduler.study_quiet_period_s",
             s.study_quiet_period_s, "a number of seconds > 0")
    _require(s.check_interval_s > 0, "scheduler.check_interval_s", s.check_interval_s,
             "a number of seconds > 0")
    _require(config.database.busy_timeout_ms >= 0, "database.busy_timeout_ms",
             config.database.busy_timeout_ms, "an integer >= 0")
    for name in ("decision_threshold", "urgent_threshold", "elevated_threshold"):
        value = getattr(config.model, name)
        _require(value == -1.0 or 0.0 <= value <= 1.0, f"model.{name}", value,
                 "-1 (the bundle's value) or a probability from 0 to 1")
    h = config.http
    _require(0 <= h.port <= 65535, "http.port", h.port, "an integer from 0 to 65535")
    try:
        loopback = ipaddress.ip_address(h.bind_address).is_loopback
    except ValueError:
        _require(False, "http.bind_address", h.bind_address, "an IPv4 or IPv6 address")
    _require(loopback or bool(h.token) or not h.enabled, "http.token", "",
             "a token (http.token, http.token_file or the http-token credential) when "
             "http.bind_address is not a loopback address")
    ret = config.retention
    for name in ("delivered_hours", "ineligible_hours"):
        _require(getattr(ret, name) >= 0, f"retention.{name}", getattr(ret, name), "hours >= 0")
    _require(ret.check_interval_s > 0, "retention.check_interval_s", ret.check_interval_s,
             "a number of seconds > 0")
    _require(r.min_free_disk_mb >= 0, "receiver.min_free_disk_mb", r.min_free_disk_mb, "an integer >= 0")
    url = config.database.url
    _require(url == "" or "://" in url, "database.url", url,
             "empty (SQLite in the state folder) or an SQLAlchemy URL such as postgresql://...")


_HL7_DELIMITERS = frozenset("|^~\\&\r\n")


def _check_hl7_destinations(destinations: tuple[HL7DestinationConfig, ...]) -> None:
    names = [dest.name for dest in destinations]
    for i, dest in enumerate(destinations):
        key = f"hl7_destinations[{i}]"
        _require(bool(dest.name) and names.count(dest.name) == 1, f"{key}.name", dest.name,
                 "a unique, non-empty name")
        _require(bool(dest.host), f"{key}.host", dest.host, "a host name or address")
        _require(1 <= dest.port <= 65535, f"{key}.port", dest.port, "an integer from 1 to 65535")
        _require(dest.version in HL7_VERSIONS, f"{key}.version", dest.version,
                 f"one of {', '.join(HL7_VERSIONS)}")
        for field_name in ("sending_application", "sending_facility", "receiving_application",
                           "receiving_facility"):
            value = getattr(dest, field_name)
            _require(len(value) <= 180 and all(32 <= ord(c) < 127 for c in value)
                     and not _HL7_DELIMITERS & set(value), f"{key}.{field_name}", value,
                     "printable ASCII without the HL7 delimiters | ^ ~ \\ &")
        _require(bool(dest.sending_application), f"{key}.sending_application",
                 dest.sending_application, "a non-empty application name (MSH-3)")
        if dest.tls.certificate:
            _require(Path(dest.tls.certificate).is_file(), f"{key}.tls.certificate",
                     dest.tls.certificate, "the path of an existing PEM file")


def _is_uid(value: str) -> bool:
    parts = value.split(".")
    return 0 < len(value) <= 64 and all(p.isdigit() and (p == "0" or not p.startswith("0"))
                                        for p in parts)
