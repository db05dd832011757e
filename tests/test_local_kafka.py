"""The local broker of scripts/local-kafka: every listener works, and the MSK IAM listener
accepts exactly the tokens MSK would, ending sessions at token expiry as MSK does."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ssl
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from sidecar.consumer import close_consumer
from tests.localkafka import SCRIPT, LocalKafka, SignerTokenProvider

TopicFactory = Callable[..., Awaitable[str]]
LISTENERS = ["plaintext", "ssl", "mtls", "scram", "iam"]


@pytest.mark.parametrize("listener", LISTENERS)
async def test_produce_and_consume_on_each_listener(
    kafka: LocalKafka, new_topic: TopicFactory, listener: str
) -> None:
    topic = await new_topic(partitions=2)
    producer = AIOKafkaProducer(**kafka.client_kwargs(listener), acks="all")
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(
                topic, f"value-{i}".encode(), key=f"key-{i}".encode(), headers=[("h", b"x")]
            )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        **kafka.client_kwargs(listener),
        group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        seen: dict[bytes, bytes] = {}
        async with asyncio.timeout(60):
            while len(seen) < 10:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        assert record.headers == (("h", b"x"),)
                        seen[record.key] = record.value
        assert seen == {f"key-{i}".encode(): f"value-{i}".encode() for i in range(10)}
        await consumer.commit()
    finally:
        await consumer.stop()


async def test_tls_is_verified_against_the_generated_ca(kafka: LocalKafka) -> None:
    """A client trusting only the system CAs must not get through: verification is real."""
    host, port = kafka.ssl.split(":")
    with pytest.raises(ssl.SSLCertVerificationError):
        await create_conn(
            host, int(port), security_protocol="SSL", ssl_context=create_ssl_context()
        )


async def test_scram_wrong_password_fails_authentication(kafka: LocalKafka) -> None:
    kwargs = kafka.client_kwargs("scram")
    host, port = kafka.scram.split(":")
    with pytest.raises(SaslAuthenticationFailed):
        await create_conn(
            host,
            int(port),
            security_protocol="SASL_SSL",
            ssl_context=kwargs["ssl_context"],
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=kafka.scram_username,
            sasl_plain_password=kafka.scram_password + "-wrong",
        )


# --- MSK IAM -------------------------------------------------------------------------------


class StaticToken(AbstractTokenProvider):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._token = token

    async def token(self) -> str:
        return self._token


async def iam_connect(kafka: LocalKafka, provider: AbstractTokenProvider, **kw: Any) -> Any:
    host, port = kafka.iam.split(":")
    return await create_conn(
        host,
        int(port),
        security_protocol="SASL_SSL",
        ssl_context=create_ssl_context(cafile=kafka.ca_file),
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_provider=provider,
        **kw,
    )


def presign(
    *,
    access_key: str,
    secret: str,
    region: str = "us-east-1",
    host: str | None = None,
    action: str = "kafka-cluster:Connect",
    signed_at: datetime | None = None,
    expires_s: int = 900,
) -> str:
    """An MSK IAM token built by hand (SigV4 query signing), so each field can be made wrong."""
    host = host or f"kafka.{region}.amazonaws.com"
    when = signed_at or datetime.now(UTC)
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{when:%Y%m%d}/{region}/kafka-cluster/aws4_request"
    params = {
        "Action": action,
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{access_key}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires_s),
        "X-Amz-SignedHeaders": "host",
    }
    query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )
    canonical = "\n".join(
        ["GET", "/", query, f"host:{host}\n", "host", hashlib.sha256(b"").hexdigest()]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret}".encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    url = f"https://{host}/?{query}&X-Amz-Signature={signature}&" + urlencode(
        {"User-Agent": "kafka-sidecar-tests"}
    )
    return base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


async def test_iam_signer_token_authenticates(kafka: LocalKafka) -> None:
    provider = SignerTokenProvider(
        kafka.aws_region, kafka.aws_access_key_id, kafka.aws_secret_access_key
    )
    conn = await iam_connect(kafka, provider)
    try:
        response = await conn.send(MetadataRequest([]))
        assert response.brokers, "an authenticated connection answers requests"
    finally:
        conn.close()
    assert provider.issued == 1


async def test_iam_hand_built_token_authenticates(kafka: LocalKafka) -> None:
    """Control for the rejection cases: the hand-built token is valid when nothing is wrong."""
    token = presign(access_key=kafka.aws_access_key_id, secret=kafka.aws_secret_access_key)
    conn = await iam_connect(kafka, StaticToken(token))
    conn.close()


def _flip_signature(token: str) -> str:
    url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    head, _, tail = url.partition("X-Amz-Signature=")
    flipped = ("0" if tail[0] != "0" else "1") + tail[1:]
    return base64.urlsafe_b64encode((head + "X-Amz-Signature=" + flipped).encode()).decode()


BAD_TOKENS: dict[str, Callable[[LocalKafka], str]] = {
    "changed-signature": lambda k: _flip_signature(
        presign(access_key=k.aws_access_key_id, secret=k.aws_secret_access_key)
    ),
    "wrong-secret": lambda k: presign(access_key=k.aws_access_key_id, secret="not-the-secret"),
    "expired": lambda k: presign(
        access_key=k.aws_access_key_id,
        secret=k.aws_secret_access_key,
        signed_at=datetime.fromtimestamp(time.time() - 1000, UTC),
    ),
    "unknown-access-key": lambda k: presign(
        access_key="AKIANOSUCHKEY0000000", secret=k.aws_secret_access_key
    ),
    "wrong-action": lambda k: presign(
        access_key=k.aws_access_key_id,
        secret=k.aws_secret_access_key,
        action="kafka-cluster:DescribeCluster",
    ),
    "wrong-host": lambda k: presign(
        access_key=k.aws_access_key_id,
        secret=k.aws_secret_access_key,
        host="kafka.example.com",
    ),
    "wrong-region": lambda k: presign(
        access_key=k.aws_access_key_id, secret=k.aws_secret_access_key, region="eu-west-1"
    ),
    "garbage": lambda k: "this is not a token",
    "base64-garbage": lambda k: base64.urlsafe_b64encode(b"https://kafka/?x").decode(),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_iam_rejects_bad_tokens_and_stays_healthy(kafka: LocalKafka, case: str) -> None:
    with pytest.raises(SaslAuthenticationFailed):
        await iam_connect(kafka, StaticToken(BAD_TOKENS[case](kafka)))
    # The broker keeps serving good clients after a rejection.
    good = SignerTokenProvider(
        kafka.aws_region, kafka.aws_access_key_id, kafka.aws_secret_access_key
    )
    conn = await iam_connect(kafka, good)
    try:
        assert (await conn.send(MetadataRequest([]))).brokers
    finally:
        conn.close()


async def test_iam_session_ends_at_token_lifetime(kafka: LocalKafka) -> None:
    """The broker drops a connection whose session is over, as MSK does (aiokafka cannot
    re-authenticate, KIP-368)."""
    closed = asyncio.Event()
    provider = SignerTokenProvider(
        kafka.aws_region,
        kafka.short_session_access_key_id,
        kafka.short_session_secret_access_key,
    )
    conn = await iam_connect(kafka, provider, on_close=lambda *_: closed.set())
    try:
        assert (await conn.send(MetadataRequest([]))).brokers
        async with asyncio.timeout(kafka.short_session_ms / 1000 * 3 + 30):
            while not closed.is_set():
                try:
                    await conn.send(MetadataRequest([]))
                except KafkaConnectionError:
                    break
                await asyncio.sleep(0.5)
        assert not conn.connected()
    finally:
        conn.close()


async def test_iam_consumer_rides_through_session_ends(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    """A plain aiokafka consumer is disconnected at each session end and comes back with a
    fresh token; it keeps receiving what is produced meanwhile."""
    topic = await new_topic(partitions=1)
    provider = SignerTokenProvider(
        kafka.aws_region,
        kafka.short_session_access_key_id,
        kafka.short_session_secret_access_key,
    )
    consumer = AIOKafkaConsumer(
        topic,
        **kafka.client_kwargs("iam", sasl_oauth_token_provider=provider),
        group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka.plaintext)
    await consumer.start()
    await producer.start()
    try:
        issued_at_start = provider.issued
        # Produce across three session lifetimes.
        count = max(10, int(kafka.short_session_ms / 1000 * 3))
        received: list[bytes] = []

        async def consume() -> None:
            while len(received) < count:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    received.extend(r.value for r in records)

        consuming = asyncio.create_task(consume())
        for i in range(count):
            await producer.send_and_wait(topic, str(i).encode())
            await asyncio.sleep(1)
        async with asyncio.timeout(60):
            await consuming
        assert received == [str(i).encode() for i in range(count)]
        assert provider.issued >= issued_at_start + 2, "re-connected with fresh tokens"
    finally:
        await producer.stop()
        await close_consumer(consumer)


def test_the_other_bed_is_refused_while_one_runs(kafka: LocalKafka) -> None:
    """Both beds take port 19092: asking for the other one says what to do instead of failing
    on a busy port; broker commands name the brokers there are."""
    other = "3" if kafka.brokers == 1 else "1"
    run = subprocess.run([str(SCRIPT), "start", "--brokers", other], capture_output=True, text=True)
    assert run.returncode == 1
    assert f"a {kafka.brokers}-broker test bed runs here" in run.stderr
    assert "'scripts/local-kafka stop' first" in run.stderr
    run = subprocess.run(
        [str(SCRIPT), "kill-broker", str(kafka.brokers)], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert f"no broker {kafka.brokers}: brokers are numbered 0 to {kafka.brokers - 1}" in run.stderr
