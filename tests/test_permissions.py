"""IAM authorization as on MSK: the local broker's authorizer denies what a key's policy does not
allow (scripts/local-kafka's restricted test keys), and the sidecar says exactly which
permission is missing, in words an operator can paste into an IAM policy, without losing or
committing past a record."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)
from grpc_health.v1 import health_pb2
from pydantic import SecretStr

from kafkasidecar.v1 import consumer_pb2 as pb
from kafkasidecar.v1 import consumer_pb2_grpc as pb_grpc
from sidecar import permissions
from sidecar.config import AwsConfig, KafkaConfig
from tests.clienttools import produce, read_topic
from tests.localkafka import IamKey, LocalKafka, committed_offsets
from tests.sidecarproc import AppStream, SidecarProcess, aws_env, group_subscription, ref
from tests.test_failures import health_of, nack, wait_health

TopicFactory = Callable[..., Awaitable[str]]
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def restricted(kafka: LocalKafka, key: IamKey | None) -> IamKey:
    """The restricted key; a failure that says what to do when the broker runs without the
    authorizer (one started before it existed)."""
    if not kafka.authorizer or key is None:
        pytest.fail(
            "the local broker runs without its MSK IAM authorizer (started before it existed): "
            "scripts/local-kafka stop && scripts/local-kafka start"
        )
    return key


def key_env(kafka: LocalKafka, key: IamKey) -> dict[str, str]:
    """A sidecar's environment with `key` as its AWS credentials."""
    env = aws_env(kafka)
    env.update(AWS_ACCESS_KEY_ID=key.access_key_id, AWS_SECRET_ACCESS_KEY=key.secret_access_key)
    return env


def log_lines(sidecar: SidecarProcess) -> list[dict[str, Any]]:
    lines = []
    for line in sidecar.logs().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                lines.append(entry)
    return lines


async def wait_log(
    sidecar: SidecarProcess, match: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    """The first JSON log line that `match`es, waiting for it."""
    async with asyncio.timeout(timeout):
        while True:
            for entry in log_lines(sidecar):
                if match(entry):
                    return entry
            assert sidecar.proc is not None
            assert sidecar.proc.poll() is None, sidecar.logs()
            await asyncio.sleep(0.2)


async def state_of(sidecar: SidecarProcess, subscription: str) -> pb.SubscriptionStatus:
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        reply = await pb_grpc.ConsumerServiceStub(channel).GetStatus(
            pb.GetStatusRequest(subscription=subscription), timeout=10
        )
    (status,) = reply.subscriptions
    assert isinstance(status, pb.SubscriptionStatus)
    return status


@pytest.fixture
def dlq_topic(kafka: LocalKafka, new_topic: TopicFactory) -> Callable[[str], Awaitable[str]]:
    """Makes `<name>.dlq` (a name the no-DLQ key's deny line matches); deleted after."""

    async def make(topic: str) -> str:
        # `*.dlq`: `<topic>.dlq`
        return await new_topic(name=topic + kafka.no_dlq_topics.removeprefix("*"))

    return make


# -- the wording -------------------------------------------------------------------------


def test_missing_permissions_are_worded_for_iam_policies_or_for_kafka_acls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(permissions, "_settings", permissions._Settings())
    permissions.configure(
        KafkaConfig(
            bootstrap_servers=["b-1:9098"],
            security_protocol="SASL_SSL",
            sasl_mechanism="AWS_MSK_IAM",
            aws=AwsConfig(region="eu-west-1"),
        )
    )
    assert str(permissions.describe_group("orders")) == (
        "missing IAM permission kafka-cluster:DescribeGroup on "
        "arn:aws:kafka:eu-west-1:*:group/*/*/orders"
    )
    assert str(permissions.idempotent_write()) == (
        "missing IAM permission kafka-cluster:WriteDataIdempotently on "
        "arn:aws:kafka:eu-west-1:*:cluster/*/*"
    )
    denied = permissions.PermissionDenied(
        [permissions.read_topic("a"), permissions.describe_topic("b")]
    )
    assert denied.fields() == {
        "iam_actions": ["kafka-cluster:DescribeTopic", "kafka-cluster:ReadData"],
        "resource_arns": [
            "arn:aws:kafka:eu-west-1:*:topic/*/*/a",
            "arn:aws:kafka:eu-west-1:*:topic/*/*/b",
        ],
    }
    assert not permissions.is_denial(RuntimeError("not a denial"))
    wrapped = RuntimeError("start failed")
    wrapped.__cause__ = GroupAuthorizationFailedError("g")
    assert permissions.denial_class(wrapped) == "GroupAuthorizationFailedError"
    assert permissions.denied_topics(TopicAuthorizationFailedError({"b", "a"})) == ["a", "b"]

    permissions.configure(
        KafkaConfig(
            bootstrap_servers=["b-1:9096"],
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="u",
            sasl_password=SecretStr("p"),
        )
    )
    assert str(permissions.join_group("orders")) == (
        "missing Kafka ACL READ on group 'orders' for the sidecar's principal"
    )
    assert str(permissions.transactional_ids("kafka-sidecar.orders.*")) == (
        "missing Kafka ACL DESCRIBE and WRITE on transactional-id 'kafka-sidecar.orders.*' for "
        "the sidecar's principal"
    )


# -- the authorizer ------------------------------------------------------------------------


async def test_a_key_without_alter_group_reads_a_topic_but_cannot_join_a_group(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    key = restricted(kafka, kafka.no_group_key)
    topic = await new_topic()
    await produce(producer, topic, 3)

    reader = AIOKafkaConsumer(auto_offset_reset="earliest", **key.client_kwargs(kafka))
    await reader.start()
    try:
        reader.assign([TopicPartition(topic, 0)])  # no group: DescribeTopic and ReadData only
        records: list[Any] = []
        async with asyncio.timeout(30):
            while len(records) < 3:
                for batch in (await reader.getmany(timeout_ms=500)).values():
                    records.extend(batch)
    finally:
        await reader.stop()

    member = AIOKafkaConsumer(
        topic, group_id=f"g-{uuid.uuid4().hex[:8]}", **key.client_kwargs(kafka)
    )
    with pytest.raises(GroupAuthorizationFailedError):
        await asyncio.wait_for(member.start(), 30)
    await member.stop()

    # No WriteData on any topic and no WriteDataIdempotently: an idempotent producer cannot
    # even get a producer id (Kafka asks authorizeByResourceType whether it may write some).
    writer = AIOKafkaProducer(enable_idempotence=True, **key.client_kwargs(kafka))
    try:
        with pytest.raises(ClusterAuthorizationFailedError):
            await asyncio.wait_for(writer.start(), 30)  # InitProducerId is part of start
    finally:
        await writer.stop()


async def test_a_deny_line_wins_over_an_allow_and_transactional_ids_need_their_own_grant(
    kafka: LocalKafka, new_topic: TopicFactory, dlq_topic: Callable[[str], Awaitable[str]]
) -> None:
    key = restricted(kafka, kafka.no_dlq_key)
    topic = await new_topic()
    dlq = await dlq_topic(topic)
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **key.client_kwargs(kafka))
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, b"allowed"), 30)
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(producer.send_and_wait(dlq, b"denied"), 30)
    finally:
        await producer.stop()

    no_txn = restricted(kafka, kafka.no_txn_key)
    transactional = AIOKafkaProducer(
        transactional_id=f"t-{uuid.uuid4().hex[:8]}", **no_txn.client_kwargs(kafka)
    )
    try:
        with pytest.raises(TransactionalIdAuthorizationFailed):
            await asyncio.wait_for(transactional.start(), 30)
    finally:
        await transactional.stop()
    allowed = AIOKafkaProducer(
        transactional_id=f"t-{uuid.uuid4().hex[:8]}", **key.client_kwargs(kafka)
    )
    await asyncio.wait_for(allowed.start(), 30)  # the no-DLQ key may: *TransactionalId
    await allowed.stop()


# -- the sidecar ---------------------------------------------------------------------------


async def test_a_sidecar_that_may_not_join_its_group_names_the_missing_permission(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    """Joining is refused until the policy changes: the sidecar says so at error level with
    the action and ARN to grant, reports NOT_SERVING, keeps retrying (a fixed policy takes
    effect without a restart) and commits nothing."""
    key = restricted(kafka, kafka.no_group_key)
    topic = await new_topic()
    await produce(producer, topic, 3)
    sub = group_subscription("nogroup", topic)
    group = sub["group_id"]
    arn = f"arn:aws:kafka:{kafka.aws_region}:*:group/*/*/{group}"
    sidecar = SidecarProcess(kafka, [sub], env=key_env(kafka, key)).start()
    try:
        line = await wait_log(sidecar, lambda e: "cannot join group" in e.get("msg", ""))
        assert line["level"] == "error"
        assert f"missing IAM permission kafka-cluster:AlterGroup on {arn}" in line["msg"]
        assert (line["subscription"], line["group_id"]) == ("nogroup", group)
        assert line["iam_actions"] == ["kafka-cluster:AlterGroup"]
        assert line["resource_arns"] == [arn]
        assert "GroupAuthorizationFailedError" in line["error"]

        await wait_health(sidecar, "nogroup", NOT_SERVING, 30)
        assert await health_of(sidecar, "") == NOT_SERVING
        status = await state_of(sidecar, "nogroup")
        assert not status.serving
        assert f"kafka-cluster:AlterGroup on {arn}" in status.state
        assert sidecar.proc is not None
        assert sidecar.proc.poll() is None, "it stays up, retrying"
        assert await committed_offsets(kafka, group) == {}
    finally:
        sidecar.stop()


async def test_a_sidecar_that_may_not_read_its_topic_names_read_data_and_is_not_serving(
    kafka: LocalKafka, producer: AIOKafkaProducer, dlq_topic: Callable[[str], Awaitable[str]]
) -> None:
    """The group is joined but every fetch is refused (no ReadData): not SERVING, an error
    naming the permission (once, not at every one-second retry), and nothing committed."""
    key = restricted(kafka, kafka.no_dlq_key)
    # A *.dlq topic: the no-DLQ key may describe it, not read it.
    topic = await dlq_topic(f"unreadable-{uuid.uuid4().hex[:8]}")
    await produce(producer, topic, 3)
    sub = group_subscription("noread", topic)
    arn = f"arn:aws:kafka:{kafka.aws_region}:*:topic/*/*/{topic}"
    sidecar = SidecarProcess(kafka, [sub], env=key_env(kafka, key)).start()
    try:
        line = await wait_log(sidecar, lambda e: "cannot fetch" in e.get("msg", ""))
        assert line["level"] == "error"
        assert f"missing IAM permission kafka-cluster:ReadData on {arn}" in line["msg"]
        assert (line["subscription"], line["group_id"]) == ("noread", sub["group_id"])
        assert line["iam_actions"] == ["kafka-cluster:ReadData"]
        await wait_health(sidecar, "noread", NOT_SERVING, 30)
        status = await state_of(sidecar, "noread")
        assert f"cannot fetch: missing IAM permission kafka-cluster:ReadData on {arn}" in (
            status.state
        )
        await asyncio.sleep(3)
        fetch_errors = [e for e in log_lines(sidecar) if "cannot fetch" in e.get("msg", "")]
        assert len(fetch_errors) == 1, "said once, not at every retry"
        assert await committed_offsets(kafka, sub["group_id"]) == {}
    finally:
        sidecar.stop()


async def test_a_dead_letter_the_policy_denies_stays_unsettled_and_names_write_data(
    kafka: LocalKafka,
    new_topic: TopicFactory,
    producer: AIOKafkaProducer,
    dlq_topic: Callable[[str], Awaitable[str]],
) -> None:
    """The DLQ write is refused (WriteData denied on *.dlq): the log names the permission and
    the config key, health is NOT_SERVING, nothing commits past the record, and once a sidecar
    with the permission takes over, the record reaches the DLQ: nothing is lost."""
    key = restricted(kafka, kafka.no_dlq_key)
    topic = await new_topic()
    dlq = await dlq_topic(topic)
    await produce(producer, topic, 5)
    sub = group_subscription("nodlq", topic, dead_letter={"topic": dlq})
    group = sub["group_id"]
    arn = f"arn:aws:kafka:{kafka.aws_region}:*:topic/*/*/{dlq}"
    sidecar = SidecarProcess(kafka, [sub], env=key_env(kafka, key)).start()
    try:
        await sidecar.wait_serving("nodlq")
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel)
            await app.open("nodlq")
            seen: set[int] = set()
            while len(seen) < 5:
                batch = (await app.next("batch")).batch
                seen.update(r.offset for r in batch.records)
                poison = [r for r in batch.records if r.offset == 2]
                if poison:
                    app.send(nack(poison, pb.NACK_ACTION_DEAD_LETTER, reason="bad"))
                app.ack(records=[ref(r) for r in batch.records if r.offset != 2])

            line = await wait_log(sidecar, lambda e: "write failed for" in e.get("msg", ""))
            assert line["level"] == "error"
            assert f"{topic}[0]@2 to {dlq}: authorization: " in line["msg"]
            assert f"missing IAM permission kafka-cluster:WriteData on {arn}" in line["msg"]
            assert "subscriptions[0].dead_letter.topic" in line["msg"]
            assert line["iam_actions"] == ["kafka-cluster:WriteData"]
            assert line["resource_arns"] == [arn]
            assert (line["cause"], line["subscription"]) == ("authorization", "nodlq")

            await wait_health(sidecar, "nodlq", NOT_SERVING, 30)
            status = await state_of(sidecar, "nodlq")
            assert f"{topic}[0]@2 (authorization: missing IAM permission" in status.state
            # Offsets 0 and 1 are committed, never anything past the unwritten letter.
            async with asyncio.timeout(30):
                while (await committed_offsets(kafka, group)).get((topic, 0)) != 2:
                    await asyncio.sleep(0.2)
            await asyncio.sleep(1)
            assert (await committed_offsets(kafka, group)).get((topic, 0)) == 2
            app.close()
    finally:
        sidecar.stop()
    assert (await committed_offsets(kafka, group)).get((topic, 0)) == 2, "not even at shutdown"

    # A sidecar allowed to write the DLQ gets the record again and dead-letters it.
    allowed = SidecarProcess(kafka, [sub]).start()
    try:
        await allowed.wait_serving("nodlq")
        async with grpc.aio.insecure_channel(allowed.address) as channel:
            app = AppStream(channel)
            await app.open("nodlq")
            batch = (await app.next("batch")).batch
            assert batch.records[0].offset == 2
            for record in batch.records:
                if record.offset == 2:
                    app.send(nack([record], pb.NACK_ACTION_DEAD_LETTER, reason="bad"))
                else:
                    app.ack(records=[ref(record)])
            (letter,) = await read_topic(kafka, dlq, 1)
            assert dict(letter.headers)["x-dlq-original-offset"] == b"2"
            async with asyncio.timeout(30):
                while (await committed_offsets(kafka, group)).get((topic, 0)) != 5:
                    await asyncio.sleep(0.2)
            app.close()
    finally:
        allowed.stop()


async def test_transactions_without_transactional_id_permissions_deliver_nothing_and_say_so(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    """Exactly-once outputs need each partition's transactional producer: without
    DescribeTransactionalId and AlterTransactionalId the partition is not taken up (nothing
    delivered, nothing committed), the log names both on the subscription's ids, and health
    is NOT_SERVING."""
    key = restricted(kafka, kafka.no_txn_key)
    topic = await new_topic()
    await produce(producer, topic, 3)
    sub = group_subscription("notxn", topic, transactions={"enabled": True})
    group = sub["group_id"]
    pattern = f"kafka-sidecar.{group}.*"
    arn = f"arn:aws:kafka:{kafka.aws_region}:*:transactional-id/*/*/{pattern}"
    sidecar = SidecarProcess(kafka, [sub], env=key_env(kafka, key)).start()
    try:
        line = await wait_log(
            sidecar, lambda e: "cannot start the transactional producer" in e.get("msg", "")
        )
        assert line["level"] == "error"
        assert f"'kafka-sidecar.{group}.{topic}.0' for {topic}[0]" in line["msg"]
        assert (
            "missing IAM permissions kafka-cluster:DescribeTransactionalId and "
            f"kafka-cluster:AlterTransactionalId on {arn}"
        ) in line["msg"]
        assert line["iam_actions"] == [
            "kafka-cluster:AlterTransactionalId",
            "kafka-cluster:DescribeTransactionalId",
        ]
        assert line["subscription"] == "notxn"
        await wait_health(sidecar, "notxn", NOT_SERVING, 30)
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel)
            await app.open("notxn")
            with pytest.raises(TimeoutError):
                await app.next("batch", timeout=3)
            app.close()
        assert await committed_offsets(kafka, group) == {}
    finally:
        sidecar.stop()
