"""A sidecar the brokers refuse at sign-in, or cannot reach at all (at start, or gone while it
consumes): it stays up, NOT_SERVING, says why in words an operator can act on (aiokafka says
only "Unable to bootstrap", MSK only "Access denied"), its status still answers, and it
recovers without a restart once the cause is gone."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import SaslAuthenticationFailed
from grpc_health.v1 import health_pb2

from tests.chaos import broker_command
from tests.clienttools import produce
from tests.harness import wait_committed
from tests.localkafka import IamKey, LocalKafka, SignerTokenProvider
from tests.sidecarproc import AppStream, SidecarProcess, aws_env, group_subscription, kafka_section
from tests.test_failures import health_of, wait_health
from tests.test_local_kafka import iam_connect
from tests.test_offsets import cli, consume_all
from tests.test_permissions import key_env, restricted, state_of, wait_log
from tests.test_server import free_port

TopicFactory = Callable[..., Awaitable[str]]
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def credentials_file(path: Path, key: IamKey) -> None:
    """A shared credentials file whose default profile is `key`: the sidecar reads it afresh at
    every signing, as it would a rotated IRSA or Pod Identity credential."""
    path.write_text(
        f"[default]\naws_access_key_id = {key.access_key_id}\n"
        f"aws_secret_access_key = {key.secret_access_key}\n"
    )


def nowhere() -> str:
    """An address nothing listens on."""
    return f"127.0.0.1:{free_port()}"


def wrong_scram_password(kafka: LocalKafka) -> dict[str, object]:
    return {**kafka_section(kafka, "scram"), "sasl_password": "not-the-password"}


async def test_a_role_without_connect_cannot_sign_in(kafka: LocalKafka) -> None:
    """As on MSK: everything allowed but kafka-cluster:Connect is no access at all."""
    key = restricted(kafka, kafka.no_connect_key)
    with pytest.raises(SaslAuthenticationFailed):
        await iam_connect(
            kafka, SignerTokenProvider(kafka.aws_region, key.access_key_id, key.secret_access_key)
        )


async def test_a_refused_iam_sign_in_names_connect_and_recovers_when_the_credentials_change(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """Refused at sign-in (a role without Connect), with a dead-letter topic configured: the
    sidecar does not exit, its subscription is NOT_SERVING and its status and log name the
    permission, the cluster ARN and the access key that signed. New credentials in the file
    take effect at the next attempt; the dead-letter topic, which could not be checked at
    start, is checked then (missing: named, and waited for), and everything is delivered."""
    refused_key = restricted(kafka, kafka.no_connect_key)
    topic = await new_topic()
    dlq = f"{topic}.dlq"
    await produce(producer, topic, 5)
    sub = group_subscription("refused", topic, dead_letter={"topic": dlq})
    creds = tmp_path / "credentials"
    credentials_file(creds, refused_key)
    env = aws_env(kafka)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(creds)
    arn = f"arn:aws:kafka:{kafka.aws_region}:*:cluster/*/*"
    sidecar = SidecarProcess(kafka, [sub], env=env).start()
    try:
        line = await wait_log(
            sidecar, lambda e: "refused the sidecar's MSK IAM sign-in" in e.get("msg", "")
        )
        assert line["level"] == "error"
        assert line.get("msg", "").startswith("cannot join the group: broker ")
        assert f"not allowed kafka-cluster:Connect on {arn}" in line.get("msg", "")
        assert f"signed with access key {refused_key.access_key_id}" in line.get("msg", "")
        assert line["iam_actions"] == ["kafka-cluster:Connect"]
        assert line["resource_arns"] == [arn]
        assert refused_key.secret_access_key not in sidecar.logs()
        await wait_health(sidecar, "refused", NOT_SERVING, 30)
        assert await health_of(sidecar, "") == NOT_SERVING
        state = (await state_of(sidecar, "refused")).state
        assert "refused the sidecar's MSK IAM sign-in" in state
        assert f"kafka-cluster:Connect on {arn}" in state
        assert sidecar.proc is not None
        assert sidecar.proc.poll() is None, "it stays up, retrying"

        # The fix: credentials the broker accepts. The dead-letter topic is checked now.
        credentials_file(creds, IamKey(kafka.aws_access_key_id, kafka.aws_secret_access_key))
        await wait_log(
            sidecar, lambda e: f"dead-letter topic {dlq!r} does not exist" in e.get("msg", "")
        )
        state = (await state_of(sidecar, "refused")).state
        assert "subscriptions[0].dead_letter.topic" in state
        await new_topic(name=dlq)
        await sidecar.wait_serving("refused")
        async with grpc.aio.insecure_channel(sidecar.address) as channel:
            app = AppStream(channel)
            await app.open("refused")
            records = await consume_all(app, 5)
            await wait_committed(kafka, sub["group_id"], topic)
            app.close()
        assert sorted(r.offset for r in records) == list(range(5))
    finally:
        sidecar.stop()


async def test_a_refused_scram_sign_in_names_the_user_and_the_password_key(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    topic = await new_topic()
    sub = group_subscription("scram", topic)
    sidecar = SidecarProcess(kafka, [sub], extra={"kafka": wrong_scram_password(kafka)}).start()
    try:
        line = await wait_log(sidecar, lambda e: "refused the sidecar's" in e.get("msg", ""))
        assert f"SCRAM-SHA-512 sign-in as {kafka.scram_username!r}" in line.get("msg", "")
        assert "kafka.sasl_username and kafka.sasl_password" in line.get("msg", "")
        assert "not-the-password" not in sidecar.logs()
        await wait_health(sidecar, "scram", NOT_SERVING, 30)
        assert "SCRAM-SHA-512 sign-in" in (await state_of(sidecar, "scram")).state
    finally:
        sidecar.stop()


async def test_brokers_unreachable_at_start_with_a_dead_letter_topic_is_not_serving_not_a_crash(
    kafka: LocalKafka,
) -> None:
    """Before, a dead-letter topic made a sidecar that started before its brokers could be
    reached (a pod whose network comes up a moment later) exit with a traceback; without one it
    waited. Now both wait, NOT_SERVING, and say which setting to look at."""
    address = nowhere()
    sub = group_subscription("nowhere", f"t-{uuid.uuid4().hex[:8]}", dead_letter={"topic": "x.dlq"})
    sidecar = SidecarProcess(kafka, [sub], extra={"kafka": {"bootstrap_servers": [address]}})
    sidecar.start()
    try:
        line = await wait_log(
            sidecar, lambda e: e.get("msg", "").startswith("cannot join the group")
        )
        assert line["level"] == "error"
        assert f"no broker of kafka.bootstrap_servers ({address}) can be reached" in line.get(
            "msg", ""
        )
        await wait_health(sidecar, "nowhere", NOT_SERVING, 30)
        state = (await state_of(sidecar, "nowhere")).state
        unreachable = f"no broker of kafka.bootstrap_servers ({address}) can be reached"
        assert state == f"cannot join the group: {unreachable}"
        assert "Traceback" not in sidecar.logs()
        assert sidecar.proc is not None
        assert sidecar.proc.poll() is None
    finally:
        sidecar.stop()
    assert sidecar.wait() == 0


@pytest.mark.parametrize("fault", ["sign-in refused", "unreachable"])
def test_an_offline_offset_reset_says_why_it_cannot_reach_kafka(
    kafka: LocalKafka, fault: str
) -> None:
    """`reset-offsets --group` talks to Kafka itself: the same words, exit 1, no traceback."""
    if fault == "unreachable":
        section: dict[str, object] = {"bootstrap_servers": [nowhere()]}
        words = "no broker of kafka.bootstrap_servers"
    else:
        section, words = wrong_scram_password(kafka), "refused the sidecar's SCRAM-SHA-512 sign-in"
    sub = group_subscription("reset", f"t-{uuid.uuid4().hex[:8]}")
    config = SidecarProcess(kafka, [sub], extra={"kafka": section}).config_path
    run = cli("reset-offsets", "--config", str(config), "--group", sub["group_id"], "--to-earliest")
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]  # after aiokafka's own line
    assert last.startswith("kafka-sidecar: cannot reach Kafka: "), run.stderr
    assert words in last
    assert "Traceback" not in run.stderr


async def through_a_lost_coordinator(
    kafka: LocalKafka,
    producer: AIOKafkaProducer,
    sidecar: SidecarProcess,
    sub: dict[str, Any],
    fault: Callable[[], Awaitable[None]],
    cure: Callable[[], Awaitable[None]],
) -> tuple[dict[str, Any], str]:
    """A stream consumes the subscription's topic (5 records, committed); `fault` takes the
    brokers away; the subscription must say so (an error line, NOT_SERVING, a status that
    answers: these are returned) and, once `cure`d, serve again by itself and deliver and
    commit the next 5 records."""
    name, group, (topic,) = sub["name"], sub["group_id"], sub["topics"]
    await sidecar.wait_serving(name)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        app = AppStream(channel)
        await app.open(name)
        await consume_all(app, 5)
        await wait_committed(kafka, group, topic)
        await fault()
        try:
            line = await wait_log(
                sidecar, lambda e: "no coordinator for the group" in e.get("msg", ""), 120
            )
            await wait_health(sidecar, name, NOT_SERVING, 30)
            state = (await state_of(sidecar, name)).state  # a 10 s deadline: it must not hang
        finally:
            await cure()
        await wait_health(sidecar, name, health_pb2.HealthCheckResponse.SERVING, 120)
        await wait_log(sidecar, lambda e: "coordinator answers again" in e.get("msg", ""))
        await produce(producer, topic, 5)
        records = await consume_all(app, 5)
        assert sorted(r.offset for r in records) == list(range(5, 10))
        await wait_committed(kafka, group, topic)
        app.close()
    return line, state


async def test_brokers_gone_while_consuming_is_not_serving_and_status_still_answers(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    """The only broker is SIGKILLed under a joined subscription with a stream attached:
    aiokafka retries quietly and would leave health SERVING; the coordinator watch makes it
    NOT_SERVING with the reason, `status` answers at once (without Kafka's figures), and
    when the broker is back the subscription serves and delivers again, losing nothing."""
    topic = await new_topic()
    await produce(producer, topic, 5)
    sub = group_subscription("gone", topic)
    sidecar = SidecarProcess(kafka, [sub]).start()
    try:
        line, state = await through_a_lost_coordinator(
            kafka,
            producer,
            sidecar,
            sub,
            fault=lambda: broker_command("kill", 0),
            cure=lambda: broker_command("start", 0),
        )
    finally:
        sidecar.stop()
    assert line["level"] == "error"
    assert "no broker of kafka.bootstrap_servers" in line["msg"]
    assert "no coordinator for the group" in state
    assert "offsets and lag unknown" in state


@contextlib.contextmanager
def extra_key(kafka: LocalKafka, *lines: str) -> Iterator[Callable[..., None]]:
    """Adds a test-only key's lines to the broker's key file (read at every sign-in; policies
    reloaded when it changes); yields a function that rewrites them; restores the file."""
    keys = Path(kafka.iam_keys_file)
    original = keys.read_text()

    def write(*lines: str) -> None:
        new = keys.with_suffix(".test")
        new.write_text(original + "\n" + "\n".join(lines) + "\n")
        os.replace(new, keys)  # the broker never reads half a file

    write(*lines)
    try:
        yield write
    finally:
        write()


async def test_a_sign_in_refused_mid_run_is_named_not_taken_for_an_outage(
    kafka: LocalKafka, new_topic: TopicFactory, producer: AIOKafkaProducer
) -> None:
    """The broker ends the sidecar's IAM sessions every 10 s, as MSK does, and then refuses
    its sign-in (Connect taken out of the role's policy): after 30 s without a coordinator the
    subscription is NOT_SERVING and says the sign-in is refused, not that the brokers are
    down. With the policy restored it serves again by itself, and nothing is lost."""
    if not kafka.iam_keys_file:
        pytest.fail("scripts/local-kafka env has no KAFKA_IAM_KEYS_FILE")
    key = IamKey(f"AKIATESTREVOKE{uuid.uuid4().hex[:6].upper()}", uuid.uuid4().hex)
    allowed = (
        f"key.{key.access_key_id}.secret={key.secret_access_key}",
        f"key.{key.access_key_id}.max_session_ms=10000",
        f"key.{key.access_key_id}.policy.all=allow * *",
    )
    revoked = (*allowed, f"key.{key.access_key_id}.policy.revoked=deny Connect cluster")
    topic = await new_topic()
    await produce(producer, topic, 5)
    sub = group_subscription("revoked", topic)
    with extra_key(kafka, *allowed) as rewrite:

        async def revoke() -> None:
            rewrite(*revoked)

        async def restore() -> None:
            rewrite(*allowed)

        sidecar = SidecarProcess(kafka, [sub], env=key_env(kafka, key)).start()
        try:
            line, state = await through_a_lost_coordinator(
                kafka, producer, sidecar, sub, fault=revoke, cure=restore
            )
        finally:
            sidecar.stop()
    assert "refused the sidecar's MSK IAM sign-in" in line["msg"]
    assert f"signed with access key {key.access_key_id}" in line["msg"]
    assert line["iam_actions"] == ["kafka-cluster:Connect"]
    assert "kafka-cluster:Connect" in state
