"""Node configuration: a TOML file, overridable by ``MAMMONODE_<SECTION>_<KEY>`` variables.

Every setting has a default (documented in the repository's config.toml). Validation names
the offending key so that a mistyped setting is one clear line, and the CLI exits with 2.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 chars of the Default repertoire, no backslash


def _ae_title(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or not _AE_TITLE.match(value):
        raise ConfigError(f"{key}: an AE title is 1-16 printable ASCII characters without backslash, got {value!r}")
    return value.strip()


@dataclass
class NodeSection:
    ae_title: str = "MAMMONODE"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: list[str] = field(default_factory=list)
    require_called_aet: bool = True
    max_associations: int = 16
    # Largest P-DATA-TF PDU we receive (advertised in A-ASSOCIATE-AC); a peer's PDU declaring more than this
    # plus 64 KiB aborts its association before any of it is buffered. 0: unlimited, and no such check.
    max_pdu: int = 262144
    network_timeout_s: float = 60.0
    # A DIMSE spool file (<storage>/tmp/spool) untouched this long is an aborted transfer's and is removed
    # while running; 0: 2 * network_timeout_s + 60. Never less than 2 * network_timeout_s.
    spool_max_age_s: float = 0.0
    acse_timeout_s: float = 5.0
    tls: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""


@dataclass
class DicomwebSection:
    # Off by default: turning it on asks for a token, or for allow_anonymous (see _validate).
    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = 8080
    token: str = ""  # when set, every request needs "Authorization: Bearer <token>"
    allow_anonymous: bool = False  # enabled with no token: refused at start unless this says so
    tls_cert: str = ""
    tls_key: str = ""
    base_url: str = ""  # public URL of this service for RetrieveURL; empty: from the request
    max_request_bytes: int = 4 << 30  # a STOW-RS body larger than this is refused with 413
    max_parts: int = 1000  # a STOW-RS request with more parts than this is refused with 413
    body_timeout_s: float = 600.0  # a request body (STOW-RS) not received within this is cut off (408)
    head_timeout_s: float = 10.0  # a connection without a complete request head after this is closed
    keep_alive_timeout_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 256  # open HTTP connections; beyond it the longest-idle one is closed
    status_page_phi: bool = False  # the status page shows study date and accession (and full UIDs)
    # JWT access tokens (OIDC single sign-on), besides or instead of the token: on when jwks_url or
    # jwks_file is set; then jwt_issuer and jwt_audience are required (see web/oidc.py).
    jwks_url: str = ""  # the identity provider's JWKS, fetched and cached for jwks_cache_s
    jwks_file: str = ""  # or a local JWKS file (re-read when it changes)
    jwks_cache_s: float = 300.0
    jwt_issuer: str = ""  # the "iss" every token must carry
    jwt_audience: str = ""  # the "aud" every token must carry (one of them, when it is a list)
    jwt_algorithms: list[str] = field(default_factory=lambda: ["RS256", "ES256"])  # asymmetric only
    jwt_leeway_s: float = 30.0  # clock skew allowed on exp, nbf and iat
    scope_claim: str = "scope"  # space-separated string or list; "scope" also accepts "scp"

    @property
    def oidc(self) -> bool:
        """Whether JWT access tokens are accepted."""
        return bool(self.jwks_url.strip() or self.jwks_file.strip())


@dataclass
class StorageSection:
    directory: str = "/var/lib/mammonode"
    # A Deflated Explicit VR Little Endian data set (C-STORE or STOW-RS) is inflated in chunks into
    # <directory>/tmp and stored inflated; one inflating beyond this is refused (0xC002) before any
    # of it is written. Guards against deflate bombs (~1000:1); raise it for deflated multi-frame objects.
    max_inflated_bytes: int = 1 << 30


@dataclass
class DatabaseSection:
    url: str = ""


@dataclass
class StudySection:
    quiet_period_s: float = 30.0
    incomplete_timeout_s: float = 900.0
    # After the incomplete timeout: "wait" (the study stays incomplete) or "image_wise" (the
    # image-wise models run on the views present and a partial result is delivered).
    incomplete_policy: str = "wait"


INCOMPLETE_POLICIES = ("wait", "image_wise")


@dataclass
class PipelineSection:
    device: str = "auto"
    weights_dir: str = "/var/lib/mammonode/weights"
    epochs: int = 10
    seed: int = 0
    augmentation: bool = True
    models: list[str] = field(default_factory=list)  # empty: every model (names checked by the CLI)
    precision: str = "fp32"
    heatmap_batch: int = 0  # 0: chosen for the device (pipeline.run.DEVICE_BATCHES)
    classifier_batch: int = 0  # augmented epochs per classifier batch; 0: chosen for the device
    threads: int = 0  # 0: all CPUs this process may use
    compile: bool = False  # compile the patch model with TorchInductor once per worker (needs a C++ compiler)
    # An input image (Rows x Columns, and what a compressed frame's own header declares) larger than
    # this is refused before decoding, so a frame declaring gigapixels never reaches a decoder.
    max_pixels: int = 64 * 1024 * 1024


@dataclass
class WorkerSection:
    enabled: bool = True
    concurrency: int = 1
    poll_interval_s: float = 2.0
    heartbeat_interval_s: float = 10.0
    stale_after_s: float = 120.0
    max_attempts: int = 3


@dataclass
class DeliverySection:
    max_attempts: int = 8
    backoff_initial_s: float = 30.0
    backoff_max_s: float = 3600.0
    poll_interval_s: float = 2.0
    # How long a destination may stay silent (association, each C-STORE response, each STOW-RS
    # read) before the attempt fails and is retried with backoff; each destination has its own
    # sender, so a hung one holds up only itself.
    timeout_s: float = 60.0


# What a destination may receive: the TID 1500 SR, the Mammography CAD SR, Parametric Maps,
# heatmap Secondary Captures, the summary Secondary Capture.
OUTPUTS = ("sr", "cad_sr", "parametric_maps", "heatmaps", "summary")
SR_SOP_CLASSES = ("comprehensive3d", "comprehensive")


@dataclass
class Destination:
    """A DIMSE peer (ae_title, host, port) or, when ``url`` is set, a STOW-RS service, and
    which results it receives."""

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False
    calling_ae_title: str = ""
    url: str = ""  # e.g. https://pacs.example.org/dicom-web ; results go to <url>/studies
    token: str = ""  # bearer token for the STOW-RS destination
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    sr_sop_class: str = "comprehensive3d"  # or "comprehensive", for archives that refuse 3D SR
    iocm: bool = False  # send an IHE IOCM rejection note for results a newer version replaces
    # DIMSE only: after sending, ask for storage commitment (N-ACTION); a delivery is committed
    # on the peer's success N-EVENT-REPORT, shown as commit-timeout when none came in time.
    storage_commitment: bool = False
    commitment_timeout_s: float = 3600.0

    @property
    def kind(self) -> str:
        return "dicomweb" if self.url else "dimse"


# Events a [[notify]] webhook may be sent (service/notifier.py says what each carries).
NOTIFY_EVENTS = ("result.ready", "study.failed", "study.incomplete", "delivery.failed")


@dataclass
class NotifyHook:
    """A webhook: a JSON POST to ``url`` for each event it lists, retried with the
    [delivery] backoff. Patient ID, name and accession number only with ``include_phi``."""

    name: str
    url: str
    events: list[str] = field(default_factory=lambda: list(NOTIFY_EVENTS))
    secret: str = ""  # when set: X-Mammonode-Signature, an HMAC-SHA256 over timestamp and body
    include_phi: bool = False
    timeout_s: float = 10.0  # connect and each read; a slower hook fails the attempt
    max_attempts: int = 8  # attempts per event before it is given up (logged, an ERROR event)


SOURCE_RETRIEVE = ("move", "get")


@dataclass
class Source:
    """A PACS studies are pulled from (``mammonode pull``): a DIMSE peer (ae_title, host,
    port; C-MOVE to node.ae_title, or C-GET on the puller's own association) or, when ``url``
    is set, a DICOMweb service (QIDO-RS + WADO-RS, optional bearer ``token``)."""

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    retrieve: str = "move"  # "move": C-MOVE to node.ae_title (the node must be running); "get": C-GET
    url: str = ""  # e.g. https://pacs.example.org/dicom-web
    token: str = ""

    @property
    def kind(self) -> str:
        return "dicomweb" if self.url else "dimse"


# Routing rules ([[rules]]): what each received instance is for. First match wins; an
# implicit last rule named "default" processes whatever no rule matched (today's behaviour).
RULE_ACTIONS = ("process", "store", "drop")
DEFAULT_RULE = "default"
# A rule's match keys and the DICOM keyword each reads; "calling_ae" is the association's
# calling AE title (never set for STOW-RS, so a rule naming it never matches those).
RULE_ATTRIBUTES: dict[str, str | None] = {
    "calling_ae": None,
    "modality": "Modality",
    "sop_class_uid": "SOPClassUID",
    "presentation_intent_type": "PresentationIntentType",
    "body_part_examined": "BodyPartExamined",
    "manufacturer": "Manufacturer",
    "station_name": "StationName",
    "view_position": "ViewPosition",
    "image_laterality": "ImageLaterality",
}
MAX_AGE_YEARS = 999  # Patient's Age (AS) holds at most three digits


@dataclass(frozen=True)
class Rule:
    """One ``[[rules]]`` table: conditions (all must hold) and the action when they do.
    ``match`` maps a key of RULE_ATTRIBUTES to case-sensitive fnmatch patterns, any of which
    may match; ``patient_age`` is an inclusive range of completed years."""

    name: str
    action: str = "process"
    match: dict[str, tuple[str, ...]] = field(default_factory=dict)
    patient_age: tuple[int, int] | None = None

    @property
    def matches_everything(self) -> bool:
        return not self.match and self.patient_age is None


@dataclass
class LoggingSection:
    level: str = "INFO"
    json: bool = False
    file: str = ""


SC_COMPRESSIONS = ("jpeg2000", "jpegls", "rle", "jpeg", "none")

# Signature algorithms a JWT access token may use: public-key ones only, so a JWKS (public keys)
# can never be used as an HMAC secret, and "none" is never among them.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass
class ResultsSection:
    """How the result images are made (reporting/)."""

    heatmap_threshold: float = 0.5  # overlay only where the heatmap probability is at least this
    benign_heatmaps: bool = False  # also a benign-heatmap Secondary Capture per view
    parametric_maps: bool = True  # the malignant heatmap of each view as a Parametric Map
    sc_compression: str = "jpeg2000"  # transfer syntax of the Secondary Captures, see SC_COMPRESSIONS
    # Send the Mammography CAD SR even from test or unverified weights (for validation set-ups
    # only: a workstation shows CAD marks as CAD, with no room for a test notice). A delivery
    # choice, not part of the result version.
    cad_sr_with_test_weights: bool = False


AUDIT_TRANSPORTS = ("", "tls", "udp")


@dataclass
class AuditSection:
    """The audit trail (mammonode/audit/): a local JSON-lines file always; with ``transport``,
    RFC 5424 syslog to an audit record repository, spooled on disk while it is unreachable."""

    file: str = ""  # empty: <storage.directory>/audit/audit.jsonl
    transport: str = ""  # "" (file only), "tls" (RFC 5425) or "udp" (RFC 5426)
    host: str = ""
    port: int = 0  # 0: 6514 for tls, 514 for udp
    ca_file: str = ""  # PEM CA bundle the repository's certificate must chain to (tls)
    cert_file: str = ""  # optional client certificate (tls, when the repository asks for one)
    key_file: str = ""
    app_name: str = "mammonode"  # APP-NAME of the syslog messages
    source_id: str = ""  # AuditSourceID; empty: node.ae_title
    enterprise_site_id: str = ""  # AuditEnterpriseSiteID; empty: left out
    spool_max_messages: int = 50000  # unsent messages kept on disk; newer ones then go to the file only


_SECTIONS = {
    "node": NodeSection,
    "dicomweb": DicomwebSection,
    "storage": StorageSection,
    "database": DatabaseSection,
    "study": StudySection,
    "pipeline": PipelineSection,
    "worker": WorkerSection,
    "delivery": DeliverySection,
    "logging": LoggingSection,
    "results": ResultsSection,
    "audit": AuditSection,
}


@dataclass
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    dicomweb: DicomwebSection = field(default_factory=DicomwebSection)
    storage: StorageSection = field(default_factory=StorageSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    study: StudySection = field(default_factory=StudySection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    delivery: DeliverySection = field(default_factory=DeliverySection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    results: ResultsSection = field(default_factory=ResultsSection)
    audit: AuditSection = field(default_factory=AuditSection)
    destinations: list[Destination] = field(default_factory=list)
    notify: list[NotifyHook] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=lambda: [Rule(DEFAULT_RULE)])
    sources: list[Source] = field(default_factory=list)
    source: str = "<defaults>"

    @property
    def storage_dir(self) -> Path:
        return Path(self.storage.directory)

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage_dir / 'mammonode.sqlite').resolve()}"

    @property
    def weights_dir(self) -> Path:
        return Path(self.pipeline.weights_dir)

    @property
    def audit_file(self) -> Path:
        return Path(self.audit.file) if self.audit.file else self.storage_dir / "audit" / "audit.jsonl"

    @property
    def audit_spool_dir(self) -> Path:
        return self.storage_dir / "audit" / "spool"


def _coerce(value: Any, target: Any, key: str) -> Any:
    """Check a TOML value (or an environment string) against the field's default type."""
    from_env = isinstance(value, str) and not isinstance(target, str)
    if isinstance(target, bool):
        if from_env:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if isinstance(target, int):
        try:
            if from_env:
                return int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        except ValueError:
            pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(target, float):
        try:
            if from_env:
                return float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        except ValueError:
            pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(target, list):
        if from_env:
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    if isinstance(target, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build_section(name: str, raw: dict[str, Any]) -> Any:
    cls = _SECTIONS[name]
    section = cls()
    known = {f.name for f in fields(cls)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown setting (known: {', '.join(sorted(known))})")
        setattr(section, key, _coerce(value, getattr(section, key), f"{name}.{key}"))
    return section


def _from_toml(value: Any, target: Any, key: str) -> Any:
    """``_coerce`` without the environment's string forms (destinations come from TOML only)."""
    if isinstance(value, str) and not isinstance(target, str):
        kind = "true or false" if isinstance(target, bool) else "a list of strings"
        raise ConfigError(f"{key}: expected {kind}, got {value!r}")
    return _coerce(value, target, key)


def _outputs(value: Any, key: str) -> list[str]:
    outputs = _from_toml(value, [], key)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise ConfigError(f"{key}: a non-empty list of {', '.join(OUTPUTS)}, got {value!r}")
    return outputs


def _destination(raw: Any, index: int) -> Destination:
    where = f"destinations[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    known = {f.name for f in fields(Destination)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
    required = ("name", "url") if "url" in raw else ("name", "ae_title", "host", "port")
    for key in required:
        if key not in raw:
            raise ConfigError(f"{where}.{key}: missing")
    dest = Destination(
        name=_coerce(raw["name"], "", f"{where}.name"),
        ae_title=_ae_title(raw["ae_title"], f"{where}.ae_title") if "ae_title" in raw else "",
        host=_coerce(raw.get("host", ""), "", f"{where}.host"),
        port=_coerce(raw.get("port", 0), 0, f"{where}.port"),
        tls=_coerce(raw.get("tls", False), False, f"{where}.tls"),
        calling_ae_title=_coerce(raw.get("calling_ae_title", ""), "", f"{where}.calling_ae_title"),
        url=_coerce(raw.get("url", ""), "", f"{where}.url"),
        token=_coerce(raw.get("token", ""), "", f"{where}.token"),
        outputs=_outputs(raw.get("outputs", list(OUTPUTS)), f"{where}.outputs"),
        sr_sop_class=_coerce(raw.get("sr_sop_class", "comprehensive3d"), "", f"{where}.sr_sop_class"),
        iocm=_from_toml(raw.get("iocm", False), False, f"{where}.iocm"),
        storage_commitment=_from_toml(raw.get("storage_commitment", False), False, f"{where}.storage_commitment"),
        commitment_timeout_s=_from_toml(raw.get("commitment_timeout_s", 3600.0), 0.0, f"{where}.commitment_timeout_s"),
    )
    if dest.storage_commitment and dest.url:
        raise ConfigError(f"{where}.storage_commitment: DIMSE destinations only (this one has a url, STOW-RS)")
    if not dest.commitment_timeout_s > 0:
        raise ConfigError(f"{where}.commitment_timeout_s: must be more than 0, got {dest.commitment_timeout_s}")
    if dest.sr_sop_class not in SR_SOP_CLASSES:
        raise ConfigError(f"{where}.sr_sop_class: comprehensive3d or comprehensive, got {dest.sr_sop_class!r}")
    if dest.url and not re.match(r"^https?://", dest.url):
        raise ConfigError(f"{where}.url: expected an http:// or https:// URL, got {dest.url!r}")
    if not dest.url and not 1 <= dest.port <= 65535:
        raise ConfigError(f"{where}.port: must be 1-65535, got {dest.port}")
    if dest.calling_ae_title:
        _ae_title(dest.calling_ae_title, f"{where}.calling_ae_title")
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", dest.name):
        raise ConfigError(f"{where}.name: letters, digits, '.', '_' and '-' only, got {dest.name!r}")
    return dest


def _notify_hook(raw: Any, index: int) -> NotifyHook:
    where = f"notify[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    defaults = NotifyHook(name="", url="")
    known = {f.name for f in fields(NotifyHook)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
    for key in ("name", "url"):
        if key not in raw:
            raise ConfigError(f"{where}.{key}: missing")
    hook = NotifyHook(
        **{key: _from_toml(value, getattr(defaults, key), f"{where}.{key}") for key, value in raw.items()}
    )
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", hook.name):
        raise ConfigError(f"{where}.name: letters, digits, '.', '_' and '-' only, got {hook.name!r}")
    try:
        parts = urlsplit(hook.url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or bracketed host
        valid = False
    if not valid:
        raise ConfigError(f"{where}.url: expected an http:// or https:// URL with a host, got {hook.url!r}")
    unknown = [e for e in hook.events if e not in NOTIFY_EVENTS]
    if unknown or not hook.events:
        raise ConfigError(f"{where}.events: a non-empty list of {', '.join(NOTIFY_EVENTS)}, got {hook.events!r}")
    if hook.timeout_s <= 0:
        raise ConfigError(f"{where}.timeout_s: must be positive, got {hook.timeout_s}")
    if hook.max_attempts < 1:
        raise ConfigError(f"{where}.max_attempts: must be at least 1, got {hook.max_attempts}")
    return hook


def _source(raw: Any, index: int) -> Source:
    where = f"sources[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    known = {f.name for f in fields(Source)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
    web = "url" in raw
    for key in ("name", "url") if web else ("name", "ae_title", "host", "port"):
        if key not in raw:
            raise ConfigError(f"{where}.{key}: missing (a source has ae_title, host and port, or a url)")
    for key in ("ae_title", "host", "port", "retrieve") if web else ("token",):
        if key in raw:
            raise ConfigError(f"{where}.{key}: not for a {'DICOMweb' if web else 'DIMSE'} source")
    defaults = Source(name="")
    source = Source(**{key: _from_toml(value, getattr(defaults, key), f"{where}.{key}") for key, value in raw.items()})
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", source.name):
        raise ConfigError(f"{where}.name: letters, digits, '.', '_' and '-' only, got {source.name!r}")
    if web:
        try:
            parts = urlsplit(source.url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(f"{where}.url: expected an http:// or https:// URL with a host, got {source.url!r}")
        return source
    source.ae_title = _ae_title(source.ae_title, f"{where}.ae_title")
    if not source.host.strip():
        raise ConfigError(f"{where}.host: must not be empty")
    if not 1 <= source.port <= 65535:
        raise ConfigError(f"{where}.port: must be 1-65535, got {source.port}")
    if source.retrieve not in SOURCE_RETRIEVE:
        raise ConfigError(f"{where}.retrieve: move or get, got {source.retrieve!r}")
    return source


def _sources(raw: Any) -> list[Source]:
    if not isinstance(raw, list):
        raise ConfigError("sources: expected an array of tables ([[sources]])")
    sources = [_source(item, i) for i, item in enumerate(raw)]
    seen: dict[str, int] = {}
    for i, source in enumerate(sources):
        if source.name in seen:
            raise ConfigError(f"sources[{i}].name: {source.name!r} is also the name of sources[{seen[source.name]}]")
        seen[source.name] = i
    return sources


def _validate_jwks_file(path: str) -> None:
    """A JWKS file that cannot serve is a start-up error, not a 503 on every request."""
    import json

    from jwt import PyJWKSet, PyJWTError

    try:
        PyJWKSet.from_dict(json.loads(Path(path).read_text()))
    except OSError as exc:
        raise ConfigError(f"dicomweb.jwks_file: cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, AttributeError, PyJWTError) as exc:
        raise ConfigError(f"dicomweb.jwks_file: {path} is not a JWKS with a usable key: {exc}") from None


def _validate_jwt(web: DicomwebSection) -> None:
    if not web.oidc:
        if web.jwt_issuer or web.jwt_audience:
            raise ConfigError("dicomweb.jwks_url: jwt_issuer/jwt_audience are set but no jwks_url or jwks_file")
        return
    if web.jwks_url.strip() and web.jwks_file.strip():
        raise ConfigError("dicomweb.jwks_file: set jwks_url or jwks_file, not both")
    for key in ("jwt_issuer", "jwt_audience", "scope_claim"):
        if not getattr(web, key).strip():
            raise ConfigError(f"dicomweb.{key}: required when JWT access tokens are on (jwks_url or jwks_file)")
    if web.jwks_url and not re.match(r"^https?://[^/?#\s]+", web.jwks_url):
        raise ConfigError(f"dicomweb.jwks_url: expected an https:// (or http://) URL, got {web.jwks_url!r}")
    bad = [a for a in web.jwt_algorithms if a not in JWT_ALGORITHMS]
    if bad or not web.jwt_algorithms:
        raise ConfigError(
            f"dicomweb.jwt_algorithms: a non-empty list of {', '.join(JWT_ALGORITHMS)}"
            f" (asymmetric only; never none or HS*), got {web.jwt_algorithms!r}"
        )
    if web.jwks_cache_s <= 0:
        raise ConfigError(f"dicomweb.jwks_cache_s: must be positive, got {web.jwks_cache_s}")
    if not 0 <= web.jwt_leeway_s <= 300:
        raise ConfigError(f"dicomweb.jwt_leeway_s: 0-300 seconds, got {web.jwt_leeway_s}")
    if web.jwks_file:
        _validate_jwks_file(web.jwks_file)


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ConfigError(
            f"{where}: expected a value or a non-empty list of values (exact, or fnmatch patterns with * ? [...]),"
            f" got {value!r}"
        )
    return tuple(v.strip() for v in values)


def _age_range(value: Any, where: str) -> tuple[int, int]:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] <= value[1] <= MAX_AGE_YEARS
    )
    if not ok:
        raise ConfigError(
            f"{where}: expected [min, max] in whole years, 0 <= min <= max <= {MAX_AGE_YEARS}, got {value!r}"
        )
    return value[0], value[1]


def _rule(raw: Any, index: int) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a [[rules]] table")
    name = raw.get("name")
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", name):
        raise ConfigError(f"{where}.name: required; letters, digits, '.', '_' and '-' only, got {name!r}")
    where = f"rules[{index}] ({name})"
    if name == DEFAULT_RULE:
        raise ConfigError(f"{where}.name: {DEFAULT_RULE!r} is the implicit last rule's; choose another name")
    known = {"name", "action", "patient_age", *RULE_ATTRIBUTES}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
    action = raw.get("action")
    if action not in RULE_ACTIONS:
        raise ConfigError(f"{where}.action: {', '.join(RULE_ACTIONS)}; got {action!r}")
    match = {key: _patterns(raw[key], f"{where}.{key}") for key in RULE_ATTRIBUTES if key in raw}
    age = _age_range(raw["patient_age"], f"{where}.patient_age") if "patient_age" in raw else None
    return Rule(name=name, action=action, match=match, patient_age=age)


def _rules(raw: Any) -> list[Rule]:
    """The configured rules in order, then the implicit default unless the last one already
    matches everything. A rule after one that matches everything could never apply: refused."""
    if not isinstance(raw, list):
        raise ConfigError("rules: expected an array of tables ([[rules]])")
    rules = [_rule(item, i) for i, item in enumerate(raw)]
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(f"rules[{i}] ({rule.name}).name: also the name of rules[{seen[rule.name]}]")
        seen[rule.name] = i
    for i, rule in enumerate(rules[:-1]):
        if rule.matches_everything:
            later = rules[i + 1]
            raise ConfigError(
                f"rules[{i + 1}] ({later.name}): never applies, rules[{i}] ({rule.name}) has no conditions"
                " and matches every instance"
            )
    if not rules or not rules[-1].matches_everything:
        rules.append(Rule(DEFAULT_RULE))
    return rules


def _validate_audit(audit: AuditSection) -> None:
    if audit.transport not in AUDIT_TRANSPORTS:
        raise ConfigError(f'audit.transport: "tls", "udp" or "" (file only), got {audit.transport!r}')
    if audit.spool_max_messages < 1:
        raise ConfigError(f"audit.spool_max_messages: must be at least 1, got {audit.spool_max_messages}")
    if not audit.transport:
        return
    if not audit.host.strip():
        raise ConfigError(f"audit.host: required when audit.transport = {audit.transport!r}")
    if audit.port == 0:
        audit.port = 6514 if audit.transport == "tls" else 514
    if not 1 <= audit.port <= 65535:
        raise ConfigError(f"audit.port: must be 1-65535, got {audit.port}")
    if not re.match(r"^[\x21-\x7e]{1,48}$", audit.app_name):
        raise ConfigError(f"audit.app_name: 1-48 printable ASCII characters without spaces, got {audit.app_name!r}")
    if audit.transport == "tls":
        if bool(audit.cert_file) != bool(audit.key_file):
            raise ConfigError("audit.key_file: cert_file and key_file go together")
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(audit, key)
            if path and not Path(path).is_file():
                raise ConfigError(f"audit.{key}: {path} is not a readable file")
    elif audit.ca_file or audit.cert_file or audit.key_file:
        raise ConfigError('audit.ca_file: certificates apply to transport = "tls" only')


def _validate(cfg: Config) -> None:
    cfg.node.ae_title = _ae_title(cfg.node.ae_title, "node.ae_title")
    for i, aet in enumerate(cfg.node.allowed_calling_aets):
        _ae_title(aet, f"node.allowed_calling_aets[{i}]")
    if not 0 <= cfg.node.port <= 65535:
        raise ConfigError(f"node.port: must be 0-65535, got {cfg.node.port}")
    if cfg.node.max_associations < 1:
        raise ConfigError("node.max_associations: must be at least 1")
    if not 0 <= cfg.dicomweb.port <= 65535:
        raise ConfigError(f"dicomweb.port: must be 0-65535, got {cfg.dicomweb.port}")
    for key in ("max_request_bytes", "max_parts", "body_timeout_s", "head_timeout_s", "keep_alive_timeout_s"):
        if getattr(cfg.dicomweb, key) <= 0:
            raise ConfigError(f"dicomweb.{key}: must be positive, got {getattr(cfg.dicomweb, key)}")
    if cfg.dicomweb.max_connections < 2:
        raise ConfigError(f"dicomweb.max_connections: must be at least 2, got {cfg.dicomweb.max_connections}")
    _validate_jwt(cfg.dicomweb)
    web_auth = cfg.dicomweb.token.strip() or cfg.dicomweb.oidc or cfg.dicomweb.allow_anonymous
    if cfg.dicomweb.enabled and not web_auth:
        raise ConfigError(
            "dicomweb.token: empty while dicomweb.enabled = true; set a token (or dicomweb.jwks_url for JWT"
            " access tokens), or dicomweb.allow_anonymous = true to serve every client without one,"
            " or dicomweb.enabled = false"
        )
    if bool(cfg.dicomweb.tls_cert) != bool(cfg.dicomweb.tls_key):
        raise ConfigError("dicomweb.tls_key: tls_cert and tls_key go together")
    if cfg.node.tls and not (cfg.node.tls_cert and cfg.node.tls_key):
        raise ConfigError("node.tls_cert: required (with node.tls_key) when node.tls = true")
    if not cfg.storage.directory:
        raise ConfigError("storage.directory: must not be empty")
    if cfg.storage.max_inflated_bytes <= 0:
        raise ConfigError(f"storage.max_inflated_bytes: must be positive, got {cfg.storage.max_inflated_bytes}")
    if cfg.database.url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", cfg.database.url):
        raise ConfigError(f"database.url: expected sqlite:/// or postgresql+psycopg:// URL, got {cfg.database.url!r}")
    if cfg.study.quiet_period_s < 0:
        raise ConfigError("study.quiet_period_s: must not be negative")
    if cfg.study.incomplete_timeout_s <= 0:
        raise ConfigError("study.incomplete_timeout_s: must be positive")
    if cfg.study.incomplete_policy not in INCOMPLETE_POLICIES:
        raise ConfigError(f"study.incomplete_policy: wait or image_wise, got {cfg.study.incomplete_policy!r}")
    if cfg.pipeline.device not in ("auto", "cpu", "cuda") and not re.match(r"^cuda:\d+$", cfg.pipeline.device):
        raise ConfigError(f"pipeline.device: auto, cpu, cuda or cuda:N, got {cfg.pipeline.device!r}")
    if cfg.pipeline.epochs < 1:
        raise ConfigError("pipeline.epochs: must be at least 1")
    for key in ("heatmap_batch", "classifier_batch"):
        if getattr(cfg.pipeline, key) < 0:
            raise ConfigError(f"pipeline.{key}: 0 (chosen for the device) or a positive batch size")
    if cfg.pipeline.max_pixels < 1:
        raise ConfigError(f"pipeline.max_pixels: must be at least 1, got {cfg.pipeline.max_pixels}")
    if cfg.pipeline.precision not in ("fp32", "bf16", "tf32"):
        raise ConfigError(f"pipeline.precision: fp32, bf16 or tf32, got {cfg.pipeline.precision!r}")
    if cfg.worker.concurrency < 1:
        raise ConfigError("worker.concurrency: must be at least 1")
    if cfg.worker.stale_after_s <= cfg.worker.heartbeat_interval_s:
        raise ConfigError("worker.stale_after_s: must be longer than worker.heartbeat_interval_s")
    if cfg.delivery.timeout_s <= 0:
        raise ConfigError(f"delivery.timeout_s: must be positive, got {cfg.delivery.timeout_s}")
    if cfg.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"logging.level: DEBUG, INFO, WARNING or ERROR, got {cfg.logging.level!r}")
    if not 0.0 <= cfg.results.heatmap_threshold <= 1.0:
        raise ConfigError(f"results.heatmap_threshold: a probability 0-1, got {cfg.results.heatmap_threshold}")
    if cfg.results.sc_compression not in SC_COMPRESSIONS:
        raise ConfigError(f"results.sc_compression: {', '.join(SC_COMPRESSIONS)}, got {cfg.results.sc_compression!r}")
    _validate_audit(cfg.audit)
    names = [d.name for d in cfg.destinations]
    if len(names) != len(set(names)):
        raise ConfigError("destinations: names must be unique")
    hooks = [h.name for h in cfg.notify]
    if len(hooks) != len(set(hooks)):
        raise ConfigError("notify: names must be unique")


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read ``path`` (``MAMMONODE_CONFIG`` or ./config.toml when None; defaults when it does
    not exist and was not asked for explicitly), then apply environment overrides."""
    environ = dict(os.environ if environ is None else environ)
    explicit = path is not None or "MAMMONODE_CONFIG" in environ
    path = Path(path or environ.get("MAMMONODE_CONFIG") or "config.toml")
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    elif explicit:
        raise ConfigError(f"{path}: config file not found")
    cfg = Config(source=str(path) if path.exists() else "<defaults>")
    for key in raw:
        if key not in _SECTIONS and key not in ("destinations", "notify", "rules", "sources"):
            known = ", ".join([*_SECTIONS, "destinations", "notify", "rules", "sources"])
            raise ConfigError(f"{key}: unknown section (known: {known})")
    for name in _SECTIONS:
        section_raw = raw.get(name, {})
        if not isinstance(section_raw, dict):
            raise ConfigError(f"{name}: expected a table")
        setattr(cfg, name, _build_section(name, section_raw))
    cfg.destinations = [_destination(d, i) for i, d in enumerate(raw.get("destinations", []))]
    hooks = raw.get("notify", [])
    if not isinstance(hooks, list):
        raise ConfigError("notify: expected an array of tables ([[notify]])")
    cfg.notify = [_notify_hook(h, i) for i, h in enumerate(hooks)]
    cfg.rules = _rules(raw.get("rules", []))
    cfg.sources = _sources(raw.get("sources", []))

    prefix = "MAMMONODE_"
    for var, value in environ.items():
        if not var.startswith(prefix) or var == "MAMMONODE_CONFIG":
            continue
        rest = var[len(prefix) :].lower()
        section_name = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section_name is None:
            continue
        key = rest[len(section_name) + 1 :]
        section = getattr(cfg, section_name)
        if not hasattr(section, key):
            raise ConfigError(f"{var}: {section_name} has no setting {key!r}")
        setattr(section, key, _coerce(value, getattr(section, key), f"{var} ({section_name}.{key})"))
    _validate(cfg)
    return cfg
