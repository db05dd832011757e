"""sidecar.auth against the real local broker: every security protocol and SASL mechanism
connects through client_kwargs, and MSK IAM tokens come from each credential source, are
signed off the event loop, cached, shared, and refreshed ahead of expiry."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError
from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
from pydantic import SecretStr

from sidecar.auth import AuthError, MskIamTokenProvider, client_kwargs
from sidecar.config import AwsConfig, KafkaConfig, SaslMechanism, SslConfig
from sidecar.consumer import close_consumer
from tests.conftest import TopicFactory
from tests.fake_sts import DUMMY_SESSION_TOKEN, FakeSts
from tests.localkafka import LocalKafka

ROLE_ARN = "arn:aws:iam::123456789012:role/kafka-sidecar-test"
# Credentials the broker does not know: a connection that works although the role was assumed
# with these proves that the token was signed with the assumed role's credentials.
SOURCE_KEY_ID = "AKIASOURCEONLY000001"
SOURCE_SECRET = "source-secret-the-broker-does-not-know"
KEY_PASSWORD = "key-password-for-tests"
SASL_MECHANISMS: dict[str, SaslMechanism] = {
    "scram-sha-512": "SCRAM-SHA-512",
    "scram-sha-256": "SCRAM-SHA-256",
    "plain": "PLAIN",
}


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AWS credentials from anywhere the machine may have them; tests add back what they use.

    Instance metadata is disabled so a missing credential fails at once instead of after
    botocore's IMDS timeouts.
    """
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "aws-empty"
    empty.touch()
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.fixture
def env_credentials(aws_env: pytest.MonkeyPatch, kafka: LocalKafka) -> None:
    """The broker's test key pair in the environment, the first link of the default chain."""
    aws_env.setenv("AWS_ACCESS_KEY_ID", kafka.aws_access_key_id)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", kafka.aws_secret_access_key)


@pytest.fixture
def credentials_file(aws_env: pytest.MonkeyPatch, kafka: LocalKafka, tmp_path: Path) -> Path:
    """A shared credentials file with the profiles of scripts/local-kafka's file, plus one whose
    keys the broker does not know (to assume roles with)."""
    path = tmp_path / "aws-credentials"
    path.write_text(
        f"[kafka-sidecar-local]\naws_access_key_id = {kafka.aws_access_key_id}\n"
        f"aws_secret_access_key = {kafka.aws_secret_access_key}\n\n"
        f"[kafka-sidecar-local-short]\naws_access_key_id = {kafka.short_session_access_key_id}\n"
        f"aws_secret_access_key = {kafka.short_session_secret_access_key}\n\n"
        f"[source]\naws_access_key_id = {SOURCE_KEY_ID}\n"
        f"aws_secret_access_key = {SOURCE_SECRET}\n"
    )
    aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    return path


@pytest.fixture
def fake_sts(aws_env: pytest.MonkeyPatch, kafka: LocalKafka) -> Iterator[FakeSts]:
    """An STS that hands out the broker's test key pair (with a session token)."""
    with FakeSts(kafka.aws_access_key_id, kafka.aws_secret_access_key).serving() as sts:
        aws_env.setenv("AWS_ENDPOINT_URL_STS", sts.url)
        yield sts


@dataclass
class SignerSpy:
    """Wraps the signer to see how often, and on which thread, a token is signed."""

    threads: list[int] = field(default_factory=list)
    delay_s: float = 0.0

    @property
    def calls(self) -> int:
        return len(self.threads)


@pytest.fixture
def signer(monkeypatch: pytest.MonkeyPatch) -> SignerSpy:
    spy = SignerSpy()
    original = MSKAuthTokenProvider.generate_auth_token_from_credentials_provider

    def spying(region: str, provider: Any) -> Any:
        spy.threads.append(threading.get_ident())
        time.sleep(spy.delay_s)
        return original(region, provider)

    monkeypatch.setattr(
        MSKAuthTokenProvider, "generate_auth_token_from_credentials_provider", spying
    )
    return spy


ProviderFactory = Callable[..., MskIamTokenProvider]


@pytest.fixture
async def providers() -> AsyncIterator[ProviderFactory]:
    """Makes token providers and closes them after the test, so no refresher outlives it."""
    made: list[MskIamTokenProvider] = []

    def make(aws: AwsConfig, **kwargs: Any) -> MskIamTokenProvider:
        made.append(MskIamTokenProvider(aws, **kwargs))
        return made[-1]

    yield make
    for provider in made:
        await provider.close()


@pytest.fixture
def auth_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="sidecar.auth")
    return caplog


def assert_no_secrets(text: str, kafka: LocalKafka) -> None:
    for secret in (
        kafka.aws_secret_access_key,
        kafka.short_session_secret_access_key,
        SOURCE_SECRET,
        DUMMY_SESSION_TOKEN,
    ):
        assert secret not in text


# --- configs and a round trip ------------------------------------------------------------------


def iam_config(kafka: LocalKafka, **aws: Any) -> KafkaConfig:
    return KafkaConfig(
        bootstrap_servers=[kafka.iam],
        security_protocol="SASL_SSL",
        sasl_mechanism="AWS_MSK_IAM",
        aws=AwsConfig(region=kafka.aws_region, **aws),
        ssl=SslConfig(cafile=Path(kafka.ca_file)),
    )


def encrypted_client_key(kafka: LocalKafka, directory: Path) -> Path:
    path = directory / "client-key-encrypted.pem"
    subprocess.run(
        [
            *("openssl", "pkey", "-aes256", "-passout", f"pass:{KEY_PASSWORD}"),
            *("-in", kafka.client_key_file, "-out", str(path)),
        ],
        check=True,
    )
    return path


def listener_config(kafka: LocalKafka, case: str, tmp_path: Path) -> KafkaConfig:
    ca = SslConfig(cafile=Path(kafka.ca_file))
    if case == "plaintext":
        return KafkaConfig(bootstrap_servers=[kafka.plaintext], security_protocol="PLAINTEXT")
    if case == "ssl":
        return KafkaConfig(bootstrap_servers=[kafka.ssl], security_protocol="SSL", ssl=ca)
    if case in ("mtls", "mtls-encrypted-key"):
        encrypted = case == "mtls-encrypted-key"
        client = SslConfig(
            cafile=Path(kafka.ca_file),
            certfile=Path(kafka.client_cert_file),
            keyfile=encrypted_client_key(kafka, tmp_path)
            if encrypted
            else Path(kafka.client_key_file),
            key_password=SecretStr(KEY_PASSWORD) if encrypted else None,
        )
        return KafkaConfig(bootstrap_servers=[kafka.ssl], security_protocol="SSL", ssl=client)
    return KafkaConfig(
        bootstrap_servers=[kafka.scram],
        security_protocol="SASL_SSL",
        sasl_mechanism=SASL_MECHANISMS[case],
        sasl_username=kafka.scram_username,
        sasl_password=SecretStr(kafka.scram_password),
        ssl=ca,
    )


async def round_trip(
    config: KafkaConfig, topic: str, provider: MskIamTokenProvider | None = None
) -> None:
    """Produce a record, consume it back and see the topic from an admin client: the three
    kinds of client the sidecar makes, all from the same client_kwargs."""
    producer = AIOKafkaProducer(**client_kwargs(config, provider), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"value", key=b"key")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        **client_kwargs(config, provider),
        group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            record = await consumer.getone()
        assert (record.key, record.value) == (b"key", b"value")
    finally:
        await consumer.stop()

    admin = AIOKafkaAdminClient(**client_kwargs(config, provider))
    await admin.start()
    try:
        assert topic in await admin.list_topics()
    finally:
        await admin.close()


# --- every protocol and mechanism ------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        "plaintext",
        "ssl",
        "mtls",
        "mtls-encrypted-key",
        *SASL_MECHANISMS,
    ],
)
async def test_round_trip_on_each_listener(
    kafka: LocalKafka, new_topic: TopicFactory, tmp_path: Path, case: str
) -> None:
    await round_trip(listener_config(kafka, case, tmp_path), await new_topic())


def test_client_kwargs_for_tls_without_hostname_check(kafka: LocalKafka) -> None:
    config = KafkaConfig(
        bootstrap_servers=["b-1.example:9094", "b-2.example:9094"],
        security_protocol="SSL",
        ssl=SslConfig(cafile=Path(kafka.ca_file), check_hostname=False),
        client_id="receipts",
        request_timeout_ms=30000,
    )
    kwargs = client_kwargs(config)
    context = kwargs.pop("ssl_context")
    assert kwargs == {
        "bootstrap_servers": ["b-1.example:9094", "b-2.example:9094"],
        "client_id": "receipts",
        "request_timeout_ms": 30000,
        "security_protocol": "SSL",
    }
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED, "the chain is still verified"


async def test_client_kwargs_shares_the_given_token_provider(
    kafka: LocalKafka, providers: ProviderFactory
) -> None:
    config = iam_config(kafka)
    shared = providers(config.aws)
    kwargs = client_kwargs(config, shared)
    assert kwargs["sasl_mechanism"] == "OAUTHBEARER"
    assert kwargs["sasl_oauth_token_provider"] is shared
    assert "sasl_plain_password" not in kwargs
    own = client_kwargs(config)["sasl_oauth_token_provider"]
    assert isinstance(own, MskIamTokenProvider)
    assert own is not shared


# --- MSK IAM: each credential source ---------------------------------------------------------


@pytest.mark.usefixtures("env_credentials")
async def test_iam_default_chain_from_env(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    providers: ProviderFactory,
    auth_logs: pytest.LogCaptureFixture,
) -> None:
    config = iam_config(kafka)
    provider = providers(config.aws)
    await provider.check()
    await round_trip(config, await new_topic(), provider)
    assert provider.refreshes == 1, "one token served the producer, consumer and admin client"
    assert_no_secrets(auth_logs.text, kafka)


@pytest.mark.usefixtures("credentials_file")
async def test_iam_profile(
    kafka: LocalKafka, new_topic: TopicFactory, providers: ProviderFactory
) -> None:
    config = iam_config(kafka, profile="kafka-sidecar-local")
    provider = providers(config.aws)
    await round_trip(config, await new_topic(), provider)
    assert provider.refreshes == 1


@pytest.mark.parametrize("source", ["default-chain", "profile"])
async def test_iam_role_arn(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    providers: ProviderFactory,
    aws_env: pytest.MonkeyPatch,
    credentials_file: Path,
    fake_sts: FakeSts,
    auth_logs: pytest.LogCaptureFixture,
    source: str,
) -> None:
    if source == "default-chain":
        aws_env.setenv("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
        aws_env.setenv("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
        config = iam_config(kafka, role_arn=ROLE_ARN, role_session_name="receipts")
    else:
        config = iam_config(
            kafka, role_arn=ROLE_ARN, role_session_name="receipts", profile="source"
        )
    provider = providers(config.aws)
    await round_trip(config, await new_topic(), provider)
    assert [(c.role_arn, c.role_session_name, c.signed_by) for c in fake_sts.calls] == [
        (ROLE_ARN, "receipts", SOURCE_KEY_ID)
    ]
    assert provider.refreshes == 1
    assert_no_secrets(auth_logs.text, kafka)


async def test_iam_default_chain_from_container_credentials(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    providers: ProviderFactory,
    aws_env: pytest.MonkeyPatch,
    fake_sts: FakeSts,
) -> None:
    """The EKS Pod Identity (and ECS task role) link of the chain: temporary credentials from
    a local HTTP endpoint. These expire before a signature would, and the token must be
    replaced by then: a signature is worth nothing once the credentials behind it expire."""
    fake_sts.lifetime = timedelta(seconds=700)
    aws_env.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", fake_sts.container_credentials_url)
    config = iam_config(kafka)
    provider = providers(config.aws)
    await round_trip(config, await new_topic(), provider)
    assert provider.expires_at <= time.time() + 700
    assert provider.refreshes == 1


async def test_assumed_role_expiry_bounds_the_token_lifetime(
    kafka: LocalKafka, providers: ProviderFactory, aws_env: pytest.MonkeyPatch, fake_sts: FakeSts
) -> None:
    fake_sts.lifetime = timedelta(seconds=300)
    aws_env.setenv("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
    provider = providers(AwsConfig(region=kafka.aws_region, role_arn=ROLE_ARN))
    await provider.token()
    assert provider.expires_at <= time.time() + 300


# --- MSK IAM: errors that say what to configure ------------------------------------------------


async def test_no_credentials_is_an_auth_error_naming_kafka_aws(
    kafka: LocalKafka,
    providers: ProviderFactory,
    aws_env: pytest.MonkeyPatch,
    auth_logs: pytest.LogCaptureFixture,
) -> None:
    # A secret without its key id is no credential, and must not turn up in the error.
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", kafka.aws_secret_access_key)
    provider = providers(AwsConfig(region=kafka.aws_region))
    with pytest.raises(AuthError) as error:
        await provider.check()
    message = str(error.value)
    assert message.startswith("kafka.aws: no AWS credentials found")
    assert "kafka.aws.profile" in message
    assert "\n" not in message
    assert provider.refreshes == 0
    assert_no_secrets(message + auth_logs.text, kafka)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("profile-without-keys", r"^kafka\.aws\.profile: AWS profile 'no-keys' has no credentials"),
        ("partial-env", r"^kafka\.aws: could not load .*missing: AWS_SECRET_ACCESS_KEY"),
    ],
)
async def test_incomplete_credentials_are_auth_errors(
    kafka: LocalKafka,
    providers: ProviderFactory,
    aws_env: pytest.MonkeyPatch,
    tmp_path: Path,
    case: str,
    expected: str,
) -> None:
    if case == "profile-without-keys":
        config_file = tmp_path / "aws-config"
        config_file.write_text("[profile no-keys]\nregion = us-east-1\n")
        aws_env.setenv("AWS_CONFIG_FILE", str(config_file))
        aws = AwsConfig(region=kafka.aws_region, profile="no-keys")
    else:
        aws_env.setenv("AWS_ACCESS_KEY_ID", kafka.aws_access_key_id)
        aws = AwsConfig(region=kafka.aws_region)
    with pytest.raises(AuthError, match=expected):
        await providers(aws).check()


@pytest.mark.usefixtures("credentials_file")
async def test_unknown_profile_is_an_auth_error(
    kafka: LocalKafka, providers: ProviderFactory
) -> None:
    provider = providers(AwsConfig(region=kafka.aws_region, profile="no-such-profile"))
    with pytest.raises(AuthError, match=r"^kafka\.aws\.profile: AWS profile 'no-such-profile'"):
        await provider.check()


@pytest.mark.usefixtures("env_credentials")
async def test_no_region_is_an_auth_error(providers: ProviderFactory) -> None:
    with pytest.raises(AuthError, match=r"^kafka\.aws\.region: "):
        await providers(AwsConfig()).check()


async def test_assume_role_denied_is_an_auth_error_without_secrets(
    kafka: LocalKafka,
    providers: ProviderFactory,
    aws_env: pytest.MonkeyPatch,
    fake_sts: FakeSts,
    auth_logs: pytest.LogCaptureFixture,
) -> None:
    fake_sts.deny = True
    aws_env.setenv("AWS_ACCESS_KEY_ID", SOURCE_KEY_ID)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", SOURCE_SECRET)
    provider = providers(AwsConfig(region=kafka.aws_region, role_arn=ROLE_ARN))
    with pytest.raises(AuthError) as error:
        await provider.check()
    message = str(error.value)
    assert message.startswith(f"kafka.aws.role_arn: AssumeRole of {ROLE_ARN}")
    assert "AccessDenied" in message
    assert_no_secrets(message + auth_logs.text, kafka)
    assert len(fake_sts.calls) == 1, "access denied is not retried"


@pytest.mark.usefixtures("aws_env")
async def test_aiokafka_treats_an_auth_error_as_a_connection_failure(
    kafka: LocalKafka, providers: ProviderFactory
) -> None:
    """token() raising inside aiokafka's connect must not escape its background tasks."""
    config = iam_config(kafka)
    producer = AIOKafkaProducer(**client_kwargs(config, providers(config.aws)))
    try:
        with pytest.raises(KafkaConnectionError):
            await producer.start()
    finally:
        await producer.stop()


# --- MSK IAM: signing off the loop, caching, sharing, refreshing --------------------------------


@pytest.mark.usefixtures("env_credentials")
async def test_signing_runs_off_the_event_loop_and_is_cached(
    kafka: LocalKafka, providers: ProviderFactory, signer: SignerSpy
) -> None:
    provider = providers(AwsConfig(region=kafka.aws_region))
    first = await provider.token()
    second = await provider.token()
    assert first == second
    assert signer.calls == 1
    assert threading.get_ident() not in signer.threads
    assert provider.refreshes == 1
    assert time.time() + 600 < provider.expires_at <= time.time() + 900


@pytest.mark.usefixtures("env_credentials")
async def test_concurrent_callers_share_one_signing(
    kafka: LocalKafka, providers: ProviderFactory, signer: SignerSpy
) -> None:
    signer.delay_s = 0.3
    provider = providers(AwsConfig(region=kafka.aws_region))
    tokens = await asyncio.gather(*(provider.token() for _ in range(20)))
    assert len(set(tokens)) == 1
    assert signer.calls == 1


@pytest.mark.usefixtures("env_credentials")
async def test_a_caller_giving_up_does_not_cancel_the_shared_signing(
    kafka: LocalKafka, providers: ProviderFactory, signer: SignerSpy
) -> None:
    signer.delay_s = 0.5
    provider = providers(AwsConfig(region=kafka.aws_region))
    impatient = asyncio.create_task(provider.token())
    patient = asyncio.create_task(provider.token())
    await asyncio.sleep(0.1)
    impatient.cancel()
    assert await patient
    assert signer.calls == 1


@pytest.mark.usefixtures("env_credentials")
async def test_a_token_near_expiry_is_replaced(
    kafka: LocalKafka, providers: ProviderFactory, signer: SignerSpy
) -> None:
    skew = 0.0
    provider = providers(
        AwsConfig(region=kafka.aws_region), refresh_margin_s=120, clock=lambda: time.time() + skew
    )
    await provider.token()
    skew = 900 - 150  # still outside the margin
    await provider.token()
    assert signer.calls == 1
    skew = 900 - 100  # inside it
    await provider.token()
    assert signer.calls == 2
    assert provider.refreshes == 2


@pytest.mark.usefixtures("env_credentials")
async def test_tokens_are_refreshed_in_the_background(
    kafka: LocalKafka, providers: ProviderFactory, signer: SignerSpy
) -> None:
    """Without anyone asking, so a reconnect at session end finds a fresh token waiting."""
    provider = providers(AwsConfig(region=kafka.aws_region), refresh_margin_s=897)
    await provider.token()
    for _ in range(300):  # a generous 30 s for what takes about 3
        if provider.refreshes >= 2:
            break
        await asyncio.sleep(0.1)
    assert provider.refreshes >= 2
    assert signer.calls == provider.refreshes
    await provider.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "msk-iam-token-refresher"]


async def test_a_failed_refresh_falls_back_to_the_still_valid_token(
    kafka: LocalKafka,
    providers: ProviderFactory,
    env_credentials: None,
    aws_env: pytest.MonkeyPatch,
    auth_logs: pytest.LogCaptureFixture,
) -> None:
    skew = 0.0
    provider = providers(AwsConfig(region=kafka.aws_region), clock=lambda: time.time() + skew)
    token = await provider.token()
    aws_env.delenv("AWS_ACCESS_KEY_ID")  # credentials gone (say, STS down) at refresh time
    skew = 900 - 60
    assert await provider.token() == token
    assert "reusing the current token" in auth_logs.text
    skew = 900 + 10
    with pytest.raises(AuthError, match=r"^kafka\.aws: no AWS credentials found"):
        await provider.token()
    assert provider.refreshes == 1
    assert_no_secrets(auth_logs.text, kafka)


async def test_background_refresh_retries_after_a_failure(
    kafka: LocalKafka,
    providers: ProviderFactory,
    env_credentials: None,
    aws_env: pytest.MonkeyPatch,
    auth_logs: pytest.LogCaptureFixture,
) -> None:
    provider = providers(AwsConfig(region=kafka.aws_region), refresh_margin_s=897)
    await provider.token()
    aws_env.delenv("AWS_ACCESS_KEY_ID")
    for _ in range(300):  # a generous 30 s for what takes about 3
        if "background MSK IAM token refresh failed" in auth_logs.text:
            break
        await asyncio.sleep(0.1)
    assert provider.refreshes == 1
    aws_env.setenv("AWS_ACCESS_KEY_ID", kafka.aws_access_key_id)
    for _ in range(300):
        if provider.refreshes >= 2:
            break
        await asyncio.sleep(0.1)
    assert provider.refreshes >= 2
    assert_no_secrets(auth_logs.text, kafka)


@pytest.mark.usefixtures("env_credentials")
async def test_unexpected_signer_errors_become_auth_errors(
    kafka: LocalKafka, providers: ProviderFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka handles only KafkaErrors from token(); anything else would kill its tasks."""

    def broken(region: str, provider: Any) -> Any:
        raise RuntimeError("signer bug")

    monkeypatch.setattr(
        MSKAuthTokenProvider, "generate_auth_token_from_credentials_provider", broken
    )
    with pytest.raises(AuthError, match=r"^kafka\.aws: could not sign .*RuntimeError: signer bug"):
        await providers(AwsConfig(region=kafka.aws_region)).token()


def test_refresh_margin_must_leave_the_token_some_life() -> None:
    with pytest.raises(ValueError, match="refresh_margin_s"):
        MskIamTokenProvider(AwsConfig(region="us-east-1"), refresh_margin_s=900)


# --- MSK IAM: sessions that end (KIP-368) ------------------------------------------------------


class CountingProvider(MskIamTokenProvider):
    """Counts token() calls: aiokafka makes one per new broker connection."""

    calls = 0

    async def token(self) -> str:
        self.calls += 1
        return await super().token()


@pytest.mark.usefixtures("credentials_file")
async def test_consumer_rides_through_session_ends_on_one_token(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    """The broker ends each session after 10 s and aiokafka reconnects (it cannot
    re-authenticate); every reconnect is served from the cache, not by signing again."""
    topic = await new_topic()
    config = iam_config(kafka, profile="kafka-sidecar-local-short")
    provider = CountingProvider(config.aws)
    consumer = AIOKafkaConsumer(
        topic,
        **client_kwargs(config, provider),
        group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext)
    await consumer.start()
    await producer.start()
    try:
        calls_at_start = provider.calls
        count = int(kafka.short_session_ms / 1000 * 2.5)
        received: list[bytes] = []

        async def consume() -> None:
            while len(received) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    received.extend(r.value for r in records)

        consuming = asyncio.create_task(consume())
        for i in range(count):
            await producer.send_and_wait(topic, str(i).encode())
            await asyncio.sleep(1)
        async with asyncio.timeout(60):
            await consuming
        assert received == [str(i).encode() for i in range(count)]
        assert provider.calls >= calls_at_start + 2, "sessions ended and aiokafka reconnected"
        assert provider.refreshes == 1, "every reconnect reused the cached token"
    finally:
        await producer.stop()
        await close_consumer(consumer)
        await provider.close()
