"""Test-side view of `scripts/local-kafka`: where its listeners are and how to reach each one."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context
from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "local-kafka"


@dataclass(frozen=True)
class LocalKafka:
    """The exports of `scripts/local-kafka env`, typed."""

    plaintext: str
    ssl: str
    scram: str
    iam: str
    ca_file: str
    client_cert_file: str
    client_key_file: str
    scram_username: str
    scram_password: str
    aws_access_key_id: str
    aws_secret_access_key: str
    aws_region: str
    short_session_access_key_id: str
    short_session_secret_access_key: str
    short_session_ms: int
    brokers: int = 1
    #: Whether the broker runs scripts/local-kafka's MSK-like IAM authorizer (a broker started
    #: before it existed does not, until it is restarted).
    authorizer: bool = False
    #: IAM keys the authorizer restricts by their policies (see scripts/local-kafka --help):
    #: reads topics but may not join groups (no kafka-cluster:AlterGroup) ...
    no_group_key: IamKey | None = None
    #: ... all a sidecar needs, but WriteData is denied on the topics `no_dlq_topics` matches ...
    no_dlq_key: IamKey | None = None
    no_dlq_topics: str = "*.dlq"
    #: ... all a sidecar needs but the transactional ids (no kafka-cluster:*TransactionalId) ...
    no_txn_key: IamKey | None = None
    #: ... everything but kafka-cluster:Connect: its sign-in is refused, as on MSK.
    no_connect_key: IamKey | None = None
    #: The IAM keys and policies the broker reads (at every sign-in, and when it changes).
    iam_keys_file: str = ""

    @property
    def replication_factor(self) -> int:
        """Replicas of test topics: all three brokers of the three-broker bed, as MSK does."""
        return min(self.brokers, 3)

    @classmethod
    def ensure_started(cls) -> LocalKafka:
        subprocess.run([str(SCRIPT), "start"], check=True)
        out = subprocess.run(
            [str(SCRIPT), "env"], check=True, capture_output=True, text=True
        ).stdout
        env: dict[str, str] = {}
        for line in out.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0] if value else ""
        return cls(
            plaintext=env["KAFKA_BOOTSTRAP_PLAINTEXT"],
            ssl=env["KAFKA_BOOTSTRAP_SSL"],
            scram=env["KAFKA_BOOTSTRAP_SCRAM"],
            iam=env["KAFKA_BOOTSTRAP_IAM"],
            ca_file=env["KAFKA_CA_FILE"],
            client_cert_file=env["KAFKA_CLIENT_CERT_FILE"],
            client_key_file=env["KAFKA_CLIENT_KEY_FILE"],
            scram_username=env["KAFKA_SCRAM_USERNAME"],
            scram_password=env["KAFKA_SCRAM_PASSWORD"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            aws_region=env["AWS_REGION"],
            short_session_access_key_id=env["KAFKA_IAM_SHORT_SESSION_ACCESS_KEY_ID"],
            short_session_secret_access_key=env["KAFKA_IAM_SHORT_SESSION_SECRET_ACCESS_KEY"],
            short_session_ms=int(env["KAFKA_IAM_SHORT_SESSION_MS"]),
            brokers=int(env["KAFKA_BROKERS"]),
            authorizer=env.get("KAFKA_IAM_AUTHORIZER") == "on",
            no_group_key=IamKey.from_env(env, "NO_GROUP"),
            no_dlq_key=IamKey.from_env(env, "NO_DLQ"),
            no_dlq_topics=env.get("KAFKA_IAM_NO_DLQ_TOPICS") or "*.dlq",
            no_txn_key=IamKey.from_env(env, "NO_TXN"),
            no_connect_key=IamKey.from_env(env, "NO_CONNECT"),
            iam_keys_file=env.get("KAFKA_IAM_KEYS_FILE", ""),
        )

    def client_kwargs(self, listener: str, **overrides: Any) -> dict[str, Any]:
        """aiokafka client arguments for one listener: plaintext, ssl, mtls, scram or iam."""
        kwargs: dict[str, Any]
        if listener == "plaintext":
            kwargs = {"bootstrap_servers": self.plaintext}
        elif listener == "ssl":
            kwargs = {
                "bootstrap_servers": self.ssl,
                "security_protocol": "SSL",
                "ssl_context": create_ssl_context(cafile=self.ca_file),
            }
        elif listener == "mtls":
            kwargs = {
                "bootstrap_servers": self.ssl,
                "security_protocol": "SSL",
                "ssl_context": create_ssl_context(
                    cafile=self.ca_file,
                    certfile=self.client_cert_file,
                    keyfile=self.client_key_file,
                ),
            }
        elif listener == "scram":
            kwargs = {
                "bootstrap_servers": self.scram,
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": self.scram_username,
                "sasl_plain_password": self.scram_password,
                "ssl_context": create_ssl_context(cafile=self.ca_file),
            }
        elif listener == "iam":
            kwargs = {
                "bootstrap_servers": self.iam,
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "OAUTHBEARER",
                "sasl_oauth_token_provider": SignerTokenProvider(
                    self.aws_region, self.aws_access_key_id, self.aws_secret_access_key
                ),
                "ssl_context": create_ssl_context(cafile=self.ca_file),
            }
        else:
            raise ValueError(f"unknown listener {listener!r}")
        kwargs.update(overrides)
        return kwargs


@dataclass(frozen=True)
class IamKey:
    """One IAM access key of the local broker's validator."""

    access_key_id: str
    secret_access_key: str

    @classmethod
    def from_env(cls, env: dict[str, str], name: str) -> IamKey | None:
        """`KAFKA_IAM_<name>_ACCESS_KEY_ID` and `..._SECRET_ACCESS_KEY`, if `env` has them."""
        key_id = env.get(f"KAFKA_IAM_{name}_ACCESS_KEY_ID")
        secret = env.get(f"KAFKA_IAM_{name}_SECRET_ACCESS_KEY")
        return cls(key_id, secret) if key_id and secret else None

    def client_kwargs(self, kafka: LocalKafka, **overrides: Any) -> dict[str, Any]:
        """aiokafka client arguments for the IAM listener, authenticating with this key."""
        provider = SignerTokenProvider(kafka.aws_region, self.access_key_id, self.secret_access_key)
        return kafka.client_kwargs("iam", sasl_oauth_token_provider=provider, **overrides)


class SignerTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """MSK IAM tokens from aws-msk-iam-sasl-signer-python, signed off the event loop.

    Counts the tokens it hands out: each new broker connection asks for one.
    """

    def __init__(self, region: str, access_key_id: str, secret_access_key: str) -> None:
        from botocore.credentials import Credentials

        self._region = region
        self._credentials = Credentials(access_key_id, secret_access_key)
        self.issued = 0

    async def token(self) -> str:
        from botocore.credentials import CredentialProvider

        credentials = self._credentials

        class _Static(CredentialProvider):  # type: ignore[misc]
            def load(self) -> Any:
                return credentials

        token, _expiry_ms = await asyncio.get_running_loop().run_in_executor(
            None,
            MSKAuthTokenProvider.generate_auth_token_from_credentials_provider,
            self._region,
            _Static(),
        )
        self.issued += 1
        return str(token)


async def committed_offsets(kafka: LocalKafka, group_id: str) -> dict[tuple[str, int], int]:
    """Kafka's own view of a group's committed offsets."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


async def end_offsets(kafka: LocalKafka, topic: str) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.plaintext)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}


async def describe_group(kafka: LocalKafka, group_id: str) -> tuple[str, list[str]]:
    """(state, member ids) of a consumer group, as the coordinator sees it."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.plaintext)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group_id])
    finally:
        await admin.close()
    (group,) = response.groups
    _error, _name, state, _ptype, _protocol, members = group[:6]
    return state, sorted(member[0] for member in members)
