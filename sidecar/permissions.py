"""Which permission a Kafka authorization error stands for, in words an operator can paste into
an MSK IAM policy.

A broker that refuses a request says only GROUP_AUTHORIZATION_FAILED or
TOPIC_AUTHORIZATION_FAILED; which of MSK's `kafka-cluster:*` actions is missing depends on what
the request was (joining a group is `AlterGroup`, finding its coordinator `DescribeGroup`,
fetching `ReadData`, producing `WriteData`). The code that made the request knows, so it names
the `Missing` permission with one of the constructors below, and this module words it:

    missing IAM permission kafka-cluster:AlterGroup on arn:aws:kafka:us-east-1:*:group/*/*/orders

The ARN is MSK's (`<type>/<cluster-name>/<cluster-uuid>/<name>`, AWS's "Semantics of IAM
authorization policy actions and resources"). The region is the sidecar's (`kafka.aws.region`,
which the config fills from `AWS_REGION` if need be); the account, cluster name and cluster
UUID are `*`, which IAM accepts as they are: the sidecar does not know them (the broker's
cluster id is not MSK's cluster UUID), and an operator may narrow them. Without IAM auth
(SCRAM, mTLS) the broker's ACLs decide, and the words are the Kafka ACL's instead
(`READ on group 'orders'`).

Pure apart from `configure`, which the daemon calls once with the Kafka config (the region and
whether IAM is in use hold for every client of the process), and `undescribable`, a metadata
probe that tells a topic the broker hides from an all-topics listing from one that is missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import TopicAuthorizationFailedError, for_code
from aiokafka.protocol.metadata import MetadataRequest

from sidecar.config import KafkaConfig

#: MSK's action for each Kafka ACL operation on each resource type (no implication between
#: them: a policy with ReadData but not DescribeTopic cannot read).
ACTIONS: dict[tuple[str, str], str] = {
    ("READ", "topic"): "kafka-cluster:ReadData",
    ("WRITE", "topic"): "kafka-cluster:WriteData",
    ("DESCRIBE", "topic"): "kafka-cluster:DescribeTopic",
    ("READ", "group"): "kafka-cluster:AlterGroup",
    ("DESCRIBE", "group"): "kafka-cluster:DescribeGroup",
    ("DESCRIBE", "transactional-id"): "kafka-cluster:DescribeTransactionalId",
    ("WRITE", "transactional-id"): "kafka-cluster:AlterTransactionalId",
    ("IDEMPOTENT_WRITE", "cluster"): "kafka-cluster:WriteDataIdempotently",
    # Not a Kafka ACL operation: MSK checks it when a client signs in (SASL), before any request.
    ("CONNECT", "cluster"): "kafka-cluster:Connect",
}


@dataclass(slots=True)
class _Settings:
    region: str = "*"
    iam: bool = True


_settings = _Settings()


def configure(kafka: KafkaConfig) -> None:
    """Wording for this process: IAM (with the region of `kafka.aws`) or Kafka ACLs."""
    _settings.iam = kafka.sasl_mechanism == "AWS_MSK_IAM"
    _settings.region = kafka.aws.region or "*"


@dataclass(frozen=True, slots=True)
class Missing:
    """A permission the broker refused: Kafka ACL operations on one resource."""

    #: Kafka ACL operations (`READ`, `DESCRIBE` ...), each one MSK action (`ACTIONS`).
    operations: tuple[str, ...]
    #: `topic`, `group`, `transactional-id` or `cluster`.
    resource_type: str
    #: The resource's name ("" for the cluster); may end in `*` for a family of them.
    name: str = ""

    @property
    def actions(self) -> list[str]:
        """MSK's names of the operations (`kafka-cluster:AlterGroup`)."""
        return [ACTIONS[(op, self.resource_type)] for op in self.operations]

    @property
    def arn(self) -> str:
        """The resource's MSK ARN, with `*` for what the sidecar does not know."""
        prefix = f"arn:aws:kafka:{_settings.region}:*:"
        if self.resource_type == "cluster":
            return prefix + "cluster/*/*"
        return f"{prefix}{self.resource_type}/*/*/{self.name}"

    def __str__(self) -> str:
        if _settings.iam:
            actions = self.actions
            noun = "permission" if len(actions) == 1 else "permissions"
            return f"missing IAM {noun} {' and '.join(actions)} on {self.arn}"
        acls = " and ".join(self.operations)
        where = "the cluster" if self.resource_type == "cluster" else f"{self.resource_type} "
        where += "" if self.resource_type == "cluster" else repr(self.name)
        return f"missing Kafka ACL {acls} on {where} for the sidecar's principal"


class PermissionDenied(Exception):
    """The broker refused a request for want of the `missing` permissions: permanent until an
    operator changes the policy (or the ACLs), so callers retry slowly and say what to grant."""

    def __init__(self, missing: Iterable[Missing]) -> None:
        self.missing = tuple(missing)
        super().__init__("; ".join(str(m) for m in self.missing))

    def fields(self) -> dict[str, object]:
        """Structured log fields for all the missing permissions."""
        if _settings.iam:
            actions = sorted({a for m in self.missing for a in m.actions})
            return {"iam_actions": actions, "resource_arns": [m.arn for m in self.missing]}
        return {"acl_missing": [str(m) for m in self.missing]}


def join_group(group_id: str) -> Missing:
    """JoinGroup, SyncGroup, Heartbeat, OffsetCommit (and AddOffsetsToTxn): READ group."""
    return Missing(("READ",), "group", group_id)


def describe_group(group_id: str) -> Missing:
    """FindCoordinator and OffsetFetch for a group: DESCRIBE group."""
    return Missing(("DESCRIBE",), "group", group_id)


def read_topic(topic: str) -> Missing:
    """Fetch (and OffsetCommit): READ topic."""
    return Missing(("READ",), "topic", topic)


def write_topic(topic: str) -> Missing:
    """Produce (and AddPartitionsToTxn): WRITE topic."""
    return Missing(("WRITE",), "topic", topic)


def describe_topic(topic: str) -> Missing:
    """Metadata, ListOffsets, OffsetFetch: DESCRIBE topic."""
    return Missing(("DESCRIBE",), "topic", topic)


def idempotent_write() -> Missing:
    """InitProducerId of an idempotent producer: IDEMPOTENT_WRITE on the cluster."""
    return Missing(("IDEMPOTENT_WRITE",), "cluster")


def connect() -> Missing:
    """Signing in at all (MSK IAM): Connect on the cluster."""
    return Missing(("CONNECT",), "cluster")


def transactional_ids(pattern: str) -> Missing:
    """FindCoordinator (DESCRIBE) and InitProducerId, AddPartitionsToTxn, EndTxn (WRITE) of a
    transactional producer. Both, always: aiokafka's error does not say which request it was,
    and a transactional producer needs both anyway."""
    return Missing(("DESCRIBE", "WRITE"), "transactional-id", pattern)


def is_denial(exc: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is the broker's authorization refusal:
    aiokafka's GroupAuthorizationFailedError, TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError, TransactionalIdAuthorizationFailed."""
    seen = 0
    while exc is not None and seen < 8:
        if any("AuthorizationFailed" in cls.__name__ for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__
        seen += 1
    return False


def denial_class(exc: BaseException | None) -> str | None:
    """The name of the authorization error's class (`GroupAuthorizationFailedError` ...) in
    an error's chain, or None: which request a denial came from often depends on it."""
    seen = 0
    while exc is not None and seen < 8:
        for cls in type(exc).__mro__:
            if "AuthorizationFailed" in cls.__name__:
                return cls.__name__
        exc = exc.__cause__
        seen += 1
    return None


def denied_topics(exc: BaseException) -> list[str]:
    """The topics a TopicAuthorizationFailedError names (aiokafka passes one topic, or a set
    of them, as its argument)."""
    if not exc.args:
        return []
    arg = exc.args[0]
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, set | frozenset | list | tuple):
        return sorted(str(topic) for topic in arg)
    return []


async def undescribable(client: AIOKafkaClient, topics: Iterable[str]) -> list[str]:
    """Of `topics`, those the broker refuses to describe to this principal.

    An all-topics metadata request (what `fetch_all_metadata` sends) leaves out the topics the
    principal may not describe, exactly as if they did not exist; asking for them by name gets
    TOPIC_AUTHORIZATION_FAILED for those instead. Never creates a topic."""
    names = sorted(set(topics))
    if not names:
        return []
    request = MetadataRequest(names, allow_auto_topic_creation=False)
    response = await client.send(client.get_random_node(), request)
    return sorted(
        str(topic[1])
        for topic in response.topics
        if for_code(topic[0]) is TopicAuthorizationFailedError
    )
