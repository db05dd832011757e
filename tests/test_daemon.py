"""`kafka-sidecar run` startup failures and shutdown, as an operator sees them: exit codes and
one clear log line naming what to fix."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import pytest

from sidecar.config import SubscriptionConfig
from sidecar.subscription import GroupSubscription
from tests.localkafka import LocalKafka, describe_group
from tests.sidecarproc import SidecarProcess, aws_env, group_subscription

TopicFactory = Callable[..., Awaitable[str]]
StartSidecar = Callable[..., Awaitable[SidecarProcess]]


def test_no_aws_credentials_fails_at_start_naming_the_key(kafka: LocalKafka) -> None:
    env = aws_env(kafka)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    sidecar = SidecarProcess(kafka, [group_subscription("s", "any-topic")], env=env).start()
    assert sidecar.wait(60) == 1
    assert "kafka.aws" in sidecar.logs()
    assert "no AWS credentials" in sidecar.logs()


def test_unbindable_listen_address_fails_naming_the_key(kafka: LocalKafka) -> None:
    sidecar = SidecarProcess(
        kafka,
        [group_subscription("s", "any-topic")],
        listener="plaintext",
        tcp="192.0.2.1:50051",  # TEST-NET-1: not an address of this machine
    ).start()
    assert sidecar.wait(60) == 1
    assert "listen.grpc" in sidecar.logs()


async def test_sigterm_exits_zero_after_leaving_the_group(
    kafka: LocalKafka, new_topic: TopicFactory, start_sidecar: StartSidecar
) -> None:
    topic = await new_topic()
    sub = group_subscription("s", topic)
    sidecar = await start_sidecar([sub], listener="plaintext")
    state, members = await describe_group(kafka, sub["group_id"])
    assert (state, len(members)) == ("Stable", 1)
    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait(60) == 0
    # It left the group (no session-timeout wait for the other members).
    assert await describe_group(kafka, sub["group_id"]) == ("Empty", [])


async def test_a_fetch_loop_that_dies_fails_the_subscription_instead_of_serving_on(
    kafka: LocalKafka, new_topic: TopicFactory
) -> None:
    """The fetch loop is supervised: if it dies, the subscription's run fails (the daemon
    then exits 1, so Kubernetes restarts it) and health says NOT_SERVING on the way."""
    topic = await new_topic()
    config = SubscriptionConfig.model_validate(group_subscription("s", topic))
    subscription = GroupSubscription(config, {"bootstrap_servers": kafka.plaintext}, None)
    health: list[bool] = []

    async def set_health(serving: bool) -> None:
        health.append(serving)

    async def dies(
        report: Callable[[str | None], Awaitable[None]] | None = None,
        denied: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("the fetch loop broke")

    subscription.consumer.run = dies  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="the fetch loop broke"):
            await asyncio.wait_for(subscription.run(set_health), timeout=60)
    finally:
        await subscription.stop()
    assert health[-1] is False
    assert "the fetch loop broke" in subscription.faults["group"]
