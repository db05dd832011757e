"""The sidecar's configuration: one YAML file, `${VAR}` expansion and `KAFKA_SIDECAR_*` overrides.

Everything is checked before the sidecar touches Kafka or opens a port, and every problem is
reported at once, named by its key path: a bad deploy fails at start with one readable list,
not with a broker or gRPC error minutes later, one restart per typo.
"""

from __future__ import annotations

import grp
import os
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

CONFIG_ENV = "KAFKA_SIDECAR_CONFIG"
ENV_PREFIX = "KAFKA_SIDECAR_"

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["AWS_MSK_IAM", "SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]

_Loc = tuple[str | int, ...]
_T = TypeVar("_T")


class ConfigError(Exception):
    """A config that cannot run, with every problem found, one `<key.path>: <message>` a line."""

    def __init__(self, problems: Sequence[str], path: Path | None = None) -> None:
        self.problems = tuple(problems)
        self.path = path
        super().__init__("\n".join(self.problems))


class _KeyProblems(ValueError):
    """Raised by cross-field rules so ConfigError can name the offending keys themselves.

    Pydantic locates a model validator's error at the model; ConfigError appends these
    locations to it, so the operator reads `kafka.sasl_mechanism`, not just `kafka`.
    """

    def __init__(self, problems: Sequence[tuple[_Loc, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{_dotted(loc)}: {message}" for loc, message in problems))


def _raise_problems(problems: Sequence[tuple[_Loc, str]]) -> None:
    if problems:
        raise _KeyProblems(problems)


def _dotted(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


# --- field types ---------------------------------------------------------------------------


def _blank_is_none(value: object) -> object:
    # `key: ${VAR:-}` and an empty env override must mean "not set", not an empty value
    # (an empty role ARN, token or CA path would fail much later and far less clearly).
    return None if value == "" else value


def _split_commas(value: object) -> object:
    # A list as one comma-separated string is how lists arrive from env vars and `${VAR}`.
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+")


def _host_port(value: str, lowest_port: int) -> str:
    host, _, port = value.rpartition(":")
    if (
        not _HOST.fullmatch(host)
        or not (port.isascii() and port.isdigit())
        or not lowest_port <= int(port) <= 65535
    ):
        raise ValueError(f"{value!r} is not host:port")
    return value


def _broker_address(value: str) -> str:
    return _host_port(value, lowest_port=1)


def _listen_address(value: str) -> str:
    # Port 0 lets the OS pick a free port; the server logs the one it bound.
    return _host_port(value, lowest_port=0)


_UNIX_PATH_MAX = 107  # Linux: sun_path is 108 bytes, NUL included


def _grpc_address(value: str) -> str:
    if value.startswith("unix:"):
        path = value.removeprefix("unix://")
        if not value.startswith("unix://") or not path.startswith("/") or path == "/":
            raise ValueError(f"{value!r}: a Unix socket is written unix:///absolute/path")
        if len(path.encode()) > _UNIX_PATH_MAX:
            # Otherwise bind fails at start with an error that does not say why.
            raise ValueError(f"{value!r}: a Unix socket path is at most {_UNIX_PATH_MAX} bytes")
        return value
    return _listen_address(value)


#: Optional values where an empty string (e.g. from `${VAR:-}`) means unset.
_Blankable = Annotated[_T | None, BeforeValidator(_blank_is_none)]
#: Kafka's own rule for topic names.
_TopicName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")]
#: NoDecode: the env source hands over the raw string so it can be comma-split, not JSON-parsed.
_BootstrapServers = Annotated[
    list[Annotated[str, AfterValidator(_broker_address)]],
    Field(min_length=1),
    NoDecode,
    BeforeValidator(_split_commas),
]
_GrpcAddresses = Annotated[
    list[Annotated[str, AfterValidator(_grpc_address)]],
    Field(min_length=1),
    NoDecode,
    BeforeValidator(_split_commas),
]
_Topics = Annotated[list[_TopicName], Field(min_length=1), NoDecode, BeforeValidator(_split_commas)]


# --- models ----------------------------------------------------------------------------------


class _Section(BaseModel):
    # Unknown keys are errors: a misspelt setting silently falling back to its default is
    # the costliest kind of config mistake.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AwsConfig(_Section):
    region: _Blankable[str] = None
    profile: _Blankable[str] = None
    role_arn: _Blankable[str] = None
    role_session_name: str = "kafka-sidecar"


class SslConfig(_Section):
    cafile: _Blankable[Path] = None
    certfile: _Blankable[Path] = None
    keyfile: _Blankable[Path] = None
    key_password: _Blankable[SecretStr] = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _client_cert_pairs(self) -> SslConfig:
        problems: list[tuple[_Loc, str]] = []
        if self.certfile is not None and self.keyfile is None:
            problems.append(
                (("keyfile",), "required with certfile (a client certificate needs its key)")
            )
        if self.keyfile is not None and self.certfile is None:
            problems.append(
                (("certfile",), "required with keyfile (a client key needs its certificate)")
            )
        if self.key_password is not None and self.keyfile is None:
            problems.append((("key_password",), "only used with keyfile"))
        _raise_problems(problems)
        return self


class KafkaConfig(_Section):
    bootstrap_servers: _BootstrapServers
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: _Blankable[SaslMechanism] = None
    sasl_username: _Blankable[str] = None
    sasl_password: _Blankable[SecretStr] = None
    aws: AwsConfig = AwsConfig()
    ssl: SslConfig = SslConfig()
    client_id: str = "kafka-sidecar"
    request_timeout_ms: int = Field(default=40000, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _region_from_environment(cls, data: Any) -> Any:
        """Let IAM auth use the region the AWS SDKs would use, so it need not be said twice."""
        if not isinstance(data, dict) or data.get("sasl_mechanism") != "AWS_MSK_IAM":
            return data
        aws = data.get("aws", {})
        if isinstance(aws, AwsConfig):
            aws = aws.model_dump()
        if not isinstance(aws, dict) or aws.get("region"):
            return data
        environ = _loading().environ
        region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        return {**data, "aws": {**aws, "region": region}} if region else data

    @model_validator(mode="after")
    def _auth_is_complete(self) -> KafkaConfig:
        problems: list[tuple[_Loc, str]] = []
        protocol, mechanism = self.security_protocol, self.sasl_mechanism
        credentials = ("sasl_username", "sasl_password")
        if not protocol.startswith("SASL_"):
            for key in ("sasl_mechanism", *credentials):
                if getattr(self, key) is not None:
                    problems.append(
                        ((key,), f"only used with SASL_SSL or SASL_PLAINTEXT, not {protocol}")
                    )
        elif mechanism is None:
            problems.append((("sasl_mechanism",), f"required with security_protocol {protocol}"))
        elif mechanism == "AWS_MSK_IAM":
            if self.aws.region is None:
                problems.append(
                    (
                        ("aws", "region"),
                        "required for AWS_MSK_IAM (or set AWS_REGION or AWS_DEFAULT_REGION)",
                    )
                )
            for key in credentials:
                if getattr(self, key) is not None:
                    problems.append(
                        ((key,), "not used with AWS_MSK_IAM: credentials come from AWS")
                    )
        else:
            for key in credentials:
                if getattr(self, key) is None:
                    problems.append(((key,), f"required for {mechanism}"))
        _raise_problems(problems)
        return self


def _octal_mode(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ValueError("must be an octal file mode such as 0660") from None
    return value


_GID_MAX = 2**32 - 2  # (gid_t)-1 means "leave the group" to chown


def _group_id(value: Any) -> Any:
    """A group name, looked up on this host when the config is loaded, or a numeric gid.

    A gid needs no entry in /etc/group (a pod's fsGroup rarely has one); a name does, so a
    misspelt one fails the config, named by its key, rather than the start."""
    if isinstance(value, bool):  # YAML's yes/no would otherwise pass as gid 1 or 0
        raise ValueError("must be a group name or a numeric gid")
    if not isinstance(value, str):
        return value
    name = value.strip()
    if not name:
        return None  # `${VAR:-}`: not set
    if name.isascii() and name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(
            f"unknown group {name!r}: not in this host's group database (a gid need not be)"
        ) from None


class ListenConfig(_Section):
    grpc: _GrpcAddresses = ["127.0.0.1:50051"]
    metrics: _Blankable[Annotated[str, AfterValidator(_listen_address)]] = "127.0.0.1:9464"
    #: A second gRPC listener that serves only grpc.health.v1: lets Kubernetes probe the pod
    #: IP while the consumer API stays on loopback and the Unix socket.
    health: _Blankable[Annotated[str, AfterValidator(_listen_address)]] = None
    auth_token: _Blankable[SecretStr] = None
    #: File mode of Unix sockets: by default their owner (the sidecar's user) and their group
    #: only. An app connects as a member of that group, or with 0666 as any local user (as far
    #: as a loopback TCP port reaches).
    unix_socket_mode: Annotated[int, BeforeValidator(_octal_mode), Field(ge=0, le=0o777)] = 0o660
    #: The group Unix sockets are given (a name or a numeric gid), one the sidecar's user
    #: belongs to and the app's shares (in Kubernetes, the pod's fsGroup). Unset: the group
    #: they are created with (the sidecar's primary group, or the folder's if it is setgid).
    unix_socket_group: Annotated[
        Annotated[int, Field(ge=0, le=_GID_MAX)] | None, BeforeValidator(_group_id)
    ] = None


class BatchConfig(_Section):
    max_records: int = Field(default=100, ge=1, le=100_000)
    max_bytes: int = Field(default=1_048_576, ge=1, le=67_108_864)
    max_wait_ms: int = Field(default=3000, ge=0, le=600_000)


class WindowConfig(_Section):
    """Per stream: the default an app gets, and the most its Open may ask for."""

    max_outstanding_batches: int = Field(default=4, ge=1)
    max_outstanding_records: int = Field(default=1000, ge=1)
    max_outstanding_bytes: int = Field(default=16_777_216, ge=1)


class RetryConfig(_Section):
    max_attempts: int = Field(default=5, ge=1)
    initial_backoff_ms: int = Field(default=1000, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    max_backoff_ms: int = 60000

    @model_validator(mode="after")
    def _backoff_range(self) -> RetryConfig:
        if self.max_backoff_ms < self.initial_backoff_ms:
            _raise_problems(
                [
                    (
                        ("max_backoff_ms",),
                        f"must be >= initial_backoff_ms ({self.initial_backoff_ms})",
                    )
                ]
            )
        return self


class DeadLetterConfig(_Section):
    topic: _TopicName


class TransactionsConfig(_Section):
    """Ack outputs written in Kafka transactions with the commit of what they settle."""

    enabled: bool = False
    #: Each assigned partition gets the transactional id
    #: `<prefix>.<group_id>.<topic>.<partition>`: the same for whichever member owns the
    #: partition, so a new owner's producer fences the previous one's (see outputs.py). MSK
    #: IAM policies grant `kafka-cluster:*TransactionalId` on
    #: `transactional-id/<cluster>/<prefix>*`.
    transactional_id_prefix: str = Field(
        default="kafka-sidecar", min_length=1, pattern=r"^[A-Za-z0-9._-]+$"
    )
    #: The broker aborts a transaction left open this long (a crashed or stopped sidecar's).
    timeout_ms: int = Field(default=60000, ge=1000, le=900_000)


class ConsumerConfig(_Section):
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(default=45000, gt=0)
    heartbeat_interval_ms: int = Field(default=3000, gt=0)
    max_poll_interval_ms: int = Field(default=300000, gt=0)
    rebalance_timeout_ms: int | None = Field(default=None, gt=0)
    fetch_max_bytes: int = Field(default=52_428_800, gt=0)
    max_partition_fetch_bytes: int = Field(default=1_048_576, gt=0)
    group_instance_id: _Blankable[str] = None
    #: read_committed: records of aborted transactions (another sidecar's outputs, say) are
    #: never delivered, and a partition is read only up to its open transactions.
    isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed"

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> ConsumerConfig:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            _raise_problems(
                [
                    (
                        ("heartbeat_interval_ms",),
                        f"must be less than session_timeout_ms ({self.session_timeout_ms})",
                    )
                ]
            )
        return self


class SubscriptionConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    topics: _Topics
    group_id: _Blankable[str] = None
    mode: Literal["group", "snapshot"] = "group"
    batch: BatchConfig = BatchConfig()
    #: partition: one batch of a partition out at a time; key: one record of a key (per
    #: partition; null keys count as one key) out at a time, in offset order, keys in
    #: parallel; none: no order.
    ordering: Literal["partition", "key", "none"] = "partition"
    ack_deadline_ms: int = Field(default=60000, ge=1000)
    commit_interval_ms: int = Field(default=1000, ge=10)
    retry: RetryConfig = RetryConfig()
    dead_letter: DeadLetterConfig | None = None
    consumer: ConsumerConfig = ConsumerConfig()
    window: WindowConfig = WindowConfig()
    revoke_grace_ms: int = Field(default=10000, ge=0)
    detach_timeout_ms: int = Field(default=60000, ge=0)
    #: Per partition, the most records fetched from the lowest unsettled one on (settled or
    #: not) before fetching it pauses: one stuck record under `ordering: none` must not let
    #: memory and the commit metadata grow without bound.
    max_unsettled_span: int = Field(default=20_000, ge=1)
    #: A partition whose commit has not moved for this long while records are unsettled or
    #: lag > 0 is stalled: a gauge, a warning naming its lowest unsettled record, and status.
    stall_after_ms: int = Field(default=300_000, ge=1000)
    #: Ack outputs written exactly once, in a transaction with the commit (mode group only).
    transactions: TransactionsConfig = TransactionsConfig()

    @field_validator("topics")
    @classmethod
    def _topics_unique(cls, topics: list[str]) -> list[str]:
        first: dict[str, int] = {}
        problems: list[tuple[_Loc, str]] = []
        for i, topic in enumerate(topics):
            if topic in first:
                problems.append(((i,), f"duplicate of topics[{first[topic]}] ({topic!r})"))
            first.setdefault(topic, i)
        _raise_problems(problems)
        return topics

    @model_validator(mode="after")
    def _fits_mode(self) -> SubscriptionConfig:
        problems: list[tuple[_Loc, str]] = []
        if self.mode == "group" and self.group_id is None:
            problems.append((("group_id",), "required with mode group"))
        if self.mode == "snapshot":
            # A snapshot reads every partition from the start on each run and never commits.
            if self.group_id is not None:
                problems.append(
                    (("group_id",), "not used with mode snapshot (it never joins a group)")
                )
            if self.dead_letter is not None:
                problems.append(
                    (("dead_letter",), "not used with mode snapshot (it never commits)")
                )
            if self.transactions.enabled:
                problems.append(
                    (
                        ("transactions", "enabled"),
                        "not used with mode snapshot (it never commits)",
                    )
                )
        if self.dead_letter is not None and self.dead_letter.topic in self.topics:
            problems.append(
                (
                    ("dead_letter", "topic"),
                    "is one of this subscription's topics: failures would loop",
                )
            )
        _raise_problems(problems)
        return self


class LogConfig(_Section):
    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)] = "INFO"
    format: Literal["json", "text"] = "json"


class TracingConfig(_Section):
    """OpenTelemetry spans for records that carry a W3C `traceparent` (needs the `otel`
    extra). Off unless an OTLP endpoint is set."""

    otlp_endpoint: _Blankable[str] = None
    service_name: str = "kafka-sidecar"


# --- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Load:
    data: dict[str, Any]
    environ: Mapping[str, str]


# What load_config is loading: BaseSettings builds its sources inside its constructor, which
# takes no such argument, so the file's data and the caller's environment travel this way.
_LOADING: ContextVar[_Load | None] = ContextVar("_LOADING", default=None)


def _loading() -> _Load:
    return _LOADING.get() or _Load({}, os.environ)


class _EnvironSource(EnvSettingsSource):
    """The KAFKA_SIDECAR_* overrides, read from a given environment rather than os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        # Same normalisation as the parent's (case-insensitive names), applied to `environ`.
        self.env_vars = {name.lower(): value for name, value in environ.items()}

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        # pydantic-settings would say only "error parsing value for field ...".
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError as exc:
            raise ConfigError(
                [f"{field_name}: override from the environment is not valid JSON ({exc})"]
            ) from None


class SidecarConfig(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    kafka: KafkaConfig
    listen: ListenConfig = ListenConfig()
    subscriptions: Annotated[list[SubscriptionConfig], Field(min_length=1)]
    log: LogConfig = LogConfig()
    tracing: TracingConfig = TracingConfig()
    shutdown_grace_ms: int = Field(default=30000, ge=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Env beats the file, so one file serves every environment with per-deploy tweaks.

        Keyword arguments (code building a config directly) beat both; no .env or secrets
        directory is read: the file and the environment are the whole story.
        """
        load = _loading()
        return (
            init_settings,
            _EnvironSource(settings_cls, load.environ),
            InitSettingsSource(settings_cls, init_kwargs=load.data),
        )

    @field_validator("subscriptions")
    @classmethod
    def _names_unique(cls, subscriptions: list[SubscriptionConfig]) -> list[SubscriptionConfig]:
        # Apps pick a subscription by name when they open a stream.
        first: dict[str, int] = {}
        problems: list[tuple[_Loc, str]] = []
        for i, sub in enumerate(subscriptions):
            if sub.name in first:
                problems.append(
                    ((i, "name"), f"duplicate of subscriptions[{first[sub.name]}] ({sub.name!r})")
                )
            first.setdefault(sub.name, i)
        _raise_problems(problems)
        return subscriptions

    def subscription(self, name: str) -> SubscriptionConfig | None:
        return next((sub for sub in self.subscriptions if sub.name == name), None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Rejects a key given twice, which plain YAML resolves silently (the last one wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may be overridden; that is their point
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            data = yaml.load(stream, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"], path) from None
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"], path) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([f"{where}: {exc.problem or exc.context}"], path) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {exc}"], path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"], path)
    return data


_REFERENCE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|\$\{"
)


def _expand(value: Any, loc: _Loc, environ: Mapping[str, str], problems: list[str]) -> Any:
    """Expand `${VAR}` in the parsed data, so a value can never inject YAML structure."""
    if isinstance(value, str):
        return _expand_text(value, loc, environ, problems)
    if isinstance(value, dict):
        return {
            key: _expand(item, (*loc, str(key)), environ, problems) for key, item in value.items()
        }
    if isinstance(value, list):
        return [_expand(item, (*loc, i), environ, problems) for i, item in enumerate(value)]
    return value


def _expand_text(text: str, loc: _Loc, environ: Mapping[str, str], problems: list[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, default = match["name"], match["default"]
        if name is None:
            problems.append(
                f"{_dotted(loc)}: malformed reference: write ${{NAME}}, ${{NAME:-default}} or $$"
            )
            return match[0]
        # Shell semantics for `:-`: the default also replaces a variable that is set but empty.
        value = environ.get(name)
        if value or (value is not None and default is None):
            return value
        if default is not None:
            return default
        problems.append(
            f"{_dotted(loc)}: environment variable {name} is not set and has no default"
        )
        return match[0]

    return _REFERENCE.sub(replace, text)


def _describe(error: ValidationError) -> list[str]:
    lines: list[str] = []
    for detail in error.errors(include_url=False):
        loc = tuple(detail["loc"])
        cause = detail.get("ctx", {}).get("error")
        if isinstance(cause, _KeyProblems):
            lines.extend(f"{_dotted(loc + sub)}: {message}" for sub, message in cause.problems)
        elif isinstance(cause, ValueError):
            lines.append(f"{_dotted(loc)}: {cause}")
        elif detail["type"] == "extra_forbidden":
            lines.append(f"{_dotted(loc)}: unknown key")
        else:
            lines.append(f"{_dotted(loc)}: {detail['msg']}")
    return lines


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> SidecarConfig:
    """Load, expand, override and validate; raise ConfigError listing every problem found.

    `environ` stands in for os.environ everywhere (`${VAR}`, KAFKA_SIDECAR_* overrides, the
    AWS region fallback), so a caller can load a config for an environment other than its own.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    if path is None:
        path = env.get(CONFIG_ENV) or None
        if path is None:
            raise ConfigError([f"no config file: give one or set {CONFIG_ENV}"])
    file = Path(path)
    problems: list[str] = []
    data = _expand(_read_yaml(file), (), env, problems)
    if problems:
        raise ConfigError(problems, file)
    token = _LOADING.set(_Load(data, env))
    try:
        return SidecarConfig()  # type: ignore[call-arg]  # the sources supply the fields
    except ValidationError as exc:
        raise ConfigError(_describe(exc), file) from None
    except ConfigError as exc:  # from _EnvironSource, which does not know the file
        raise ConfigError(exc.problems, file) from None
    finally:
        _LOADING.reset(token)


def redacted(config: SidecarConfig) -> dict[str, Any]:
    """The effective config as plain data, safe to print or log: every secret is masked."""
    return config.model_dump(mode="json")
