"""How the sidecar authenticates to Kafka: aiokafka connection arguments and MSK IAM tokens.

MSK IAM tokens come from aws-msk-iam-sasl-signer-python, which is synchronous and resolves
credentials from scratch on every call (a fresh botocore session; maybe a round trip to STS,
IMDS or EKS Pod Identity). aiokafka asks the token provider for a token on every new broker
connection, and since it cannot re-authenticate (KIP-368) every connection is dropped when its
session ends, so all connections come back for tokens at about the same time. Hence the
provider below signs in a worker thread, caches the token, lets concurrent callers share one
signing and refreshes ahead of expiry in the background: reconnecting costs no AWS round trip.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import botocore.session
from aiokafka.abc import AbstractTokenProvider
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError, SaslAuthenticationFailed
from aiokafka.helpers import create_ssl_context
from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
from botocore.config import Config
from botocore.credentials import CredentialProvider, Credentials
from botocore.exceptions import BotoCoreError, ClientError, ProfileNotFound

from sidecar import permissions
from sidecar.config import AwsConfig, KafkaConfig, SslConfig

log = logging.getLogger("sidecar.auth")

_TOKEN_LIFETIME_S: float = MSKAuthTokenProvider.DEFAULT_TOKEN_EXPIRY_SECONDS
"""How long a signer token is valid (the signer does not let callers choose)."""

_MIN_REFRESH_DELAY_S = 1.0
"""Floor for the background refresher's sleep, so a token that is stale as soon as it is
signed (credentials about to expire) cannot make it sign in a tight loop."""
_RETRY_BASE_S = 1.0
_RETRY_MAX_S = 60.0

# STS is called in a worker thread that token() callers may be waiting on: fail in seconds,
# not in botocore's default minutes, and let the refresher do the retrying.
_STS_CONFIG = Config(
    connect_timeout=5, read_timeout=10, retries={"mode": "standard", "max_attempts": 3}
)

_CHAIN = (
    "checked env, shared config/credentials files, web identity/IRSA, EKS Pod Identity, "
    "instance metadata"
)


class AuthError(KafkaError):  # type: ignore[misc]
    """Kafka authentication cannot work as configured; the message names the config key.

    A KafkaError because aiokafka calls ``token()`` while connecting and handles only its own
    errors there: this way an STS outage is a failed connection that aiokafka retries, not an
    exception escaping its background tasks.
    """

    def __str__(self) -> str:
        # KafkaError's __str__ prefixes the class name; operators should see just the message.
        return str(self.args[0]) if self.args else ""


def client_kwargs(
    kafka: KafkaConfig, token_provider: MskIamTokenProvider | None = None
) -> dict[str, Any]:
    """The connection arguments every aiokafka client of the sidecar gets.

    Consumers, producers and admin clients should share one ``token_provider`` so that they
    share its cached token; without one, a new provider is made from ``kafka.aws``.
    """
    kwargs: dict[str, Any] = {
        "bootstrap_servers": list(kafka.bootstrap_servers),
        "client_id": kafka.client_id,
        "request_timeout_ms": kafka.request_timeout_ms,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = _ssl_context(kafka.ssl)
    if kafka.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        kwargs.update(_sasl_kwargs(kafka, token_provider))
    return kwargs


class SignInRefused(AuthError):
    """A broker refused the sidecar's SASL sign-in.

    aiokafka logs the refusal as one more connection failure and then fails with "Unable to
    bootstrap", which reads like a network fault; on MSK the broker's own words are just
    "Access denied". This says what an operator checks: for IAM the role's
    `kafka-cluster:Connect`, the region the token is signed for and whose credentials signed
    it; for SCRAM the user and its secret."""

    def __init__(self, message: str, fields: dict[str, object]) -> None:
        super().__init__(message)
        self.fields = fields


async def connection_failure(
    exc: KafkaConnectionError, kwargs: dict[str, Any]
) -> tuple[str, dict[str, object]]:
    """aiokafka's "Unable to bootstrap" in words that say what to look at, with log fields
    (`unreachable`); other connection errors as they are."""
    if "Unable to bootstrap" in str(exc):
        return await unreachable(kwargs)
    return str(exc), {}


async def unreachable(kwargs: dict[str, Any]) -> tuple[str, dict[str, object]]:
    """Why the brokers of `kwargs` do not answer, with log fields: one refuses the sign-in
    (`sign_in_refusal`), or none can be reached at all."""
    if refused := await sign_in_refusal(kwargs):
        return str(refused), refused.fields
    return f"no broker of kafka.bootstrap_servers ({_servers(kwargs)}) can be reached", {}


def _servers(kwargs: dict[str, Any]) -> str:
    """The bootstrap addresses of `client_kwargs`, for messages (a list, or aiokafka's string)."""
    servers = kwargs["bootstrap_servers"]
    return servers if isinstance(servers, str) else ", ".join(servers)


async def sign_in_refusal(kwargs: dict[str, Any]) -> SignInRefused | None:
    """Why aiokafka could not bootstrap with `kwargs` (`client_kwargs`), if a broker refused
    the sign-in: connects to the bootstrap addresses as aiokafka would, until one answers.
    None if none refused (unreachable, or signed in: reachable again). A refused MSK IAM token
    is dropped, so the next connection signs afresh (fixed or rotated credentials take effect
    without a restart). Only called after a failed bootstrap or a lost coordinator."""
    connect = {k: v for k, v in kwargs.items() if k != "bootstrap_servers"}
    for host, port, _ in collect_hosts(kwargs["bootstrap_servers"], randomize=False):
        try:
            conn = await create_conn(host, port, **connect)
        except SaslAuthenticationFailed as exc:
            provider = kwargs.get("sasl_oauth_token_provider")
            if isinstance(provider, MskIamTokenProvider):
                provider.refused()
            return _refused(f"{host}:{port}", exc, kwargs)
        except (OSError, KafkaError, TimeoutError):
            continue
        conn.close()
        return None  # signed in: the credentials are good
    return None


def _refused(address: str, exc: BaseException, kwargs: dict[str, Any]) -> SignInRefused:
    said = _one_line(exc)
    provider = kwargs.get("sasl_oauth_token_provider")
    if isinstance(provider, MskIamTokenProvider):
        connect = permissions.connect()
        return SignInRefused(
            f"broker {address} refused the sidecar's MSK IAM sign-in ({said}). MSK says "
            f"'Access denied' when the role is not allowed {connect.actions[0]} on "
            f"{connect.arn}, when the token is signed for another region than the cluster's "
            "(kafka.aws.region) or when the credentials are not valid (kafka.aws). The token "
            f"was signed with {provider.signed_with or 'no credentials yet'}",
            {"broker": address, "iam_actions": connect.actions, "resource_arns": [connect.arn]},
        )
    mechanism = kwargs.get("sasl_mechanism")
    user = kwargs.get("sasl_plain_username")
    return SignInRefused(
        f"broker {address} refused the sidecar's {mechanism} sign-in as {user!r} ({said}). "
        "Check kafka.sasl_username and kafka.sasl_password (on MSK, the user and password of "
        "an AmazonMSK_ secret associated with the cluster)",
        {"broker": address, "sasl_mechanism": mechanism, "sasl_username": user},
    )


def _ssl_context(tls: SslConfig) -> ssl.SSLContext:
    context: ssl.SSLContext = create_ssl_context(
        cafile=tls.cafile,
        certfile=tls.certfile,
        keyfile=tls.keyfile,
        password=tls.key_password.get_secret_value() if tls.key_password else None,
    )
    context.check_hostname = tls.check_hostname
    return context


def _sasl_kwargs(kafka: KafkaConfig, token_provider: MskIamTokenProvider | None) -> dict[str, Any]:
    # KafkaConfig has already checked that the mechanism and its credentials are there.
    if kafka.sasl_mechanism == "AWS_MSK_IAM":
        return {
            "sasl_mechanism": "OAUTHBEARER",
            "sasl_oauth_token_provider": token_provider or MskIamTokenProvider(kafka.aws),
        }
    password = kafka.sasl_password
    return {
        "sasl_mechanism": kafka.sasl_mechanism,
        "sasl_plain_username": kafka.sasl_username,
        "sasl_plain_password": password.get_secret_value() if password is not None else None,
    }


@dataclass(frozen=True)
class _Signed:
    token: str
    expires_at: float
    access_key_id: str
    region: str


class _Resolved(CredentialProvider):  # type: ignore[misc]
    """Hands the signer credentials resolved here, so that their errors can be told apart."""

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


class MskIamTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """MSK IAM (OAUTHBEARER) tokens for aiokafka from ``kafka.aws``: the default credential
    chain, a profile, or a role ARN assumed with either.

    A token is handed out until ``refresh_margin_s`` before it expires, so every connection
    gets a session of at least that long. ``refreshes`` (successful signings) and
    ``expires_at`` (epoch seconds; 0 before the first token) are there for metrics.
    """

    def __init__(
        self,
        aws: AwsConfig,
        *,
        refresh_margin_s: float = 120,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 <= refresh_margin_s < _TOKEN_LIFETIME_S:
            raise ValueError(f"refresh_margin_s must be in [0, {_TOKEN_LIFETIME_S:.0f})")
        self._aws = aws
        self._margin = refresh_margin_s
        self._clock = clock
        self._token: str | None = None
        self.expires_at = 0.0
        self.refreshes = 0
        #: Signing attempts that failed (no credentials, STS errors), for metrics.
        self.failures = 0
        #: Whose token the broker sees (the access key id, never the secret), where the
        #: credentials came from and the region signed for: what an operator checks first when
        #: the broker refuses the sign-in ("" before the first token).
        self.signed_with = ""
        self._signing: asyncio.Task[str] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False

    async def check(self) -> None:
        """Gets a first token, so that missing credentials stop the sidecar at start with an
        AuthError that says what to configure, rather than as endless connection retries."""
        await self.token()

    async def token(self) -> str:
        if self._token is not None and self._clock() < self._stale_at():
            return self._token
        try:
            token = await self._refresh()
        except AuthError as e:
            # A token close to expiry still buys a short session: better than none.
            if self._token is None or self._clock() >= self.expires_at:
                raise
            log.warning(
                "%s; reusing the current token, which expires in %.0f s",
                e,
                self.expires_at - self._clock(),
            )
            return self._token
        if self._refresher is None and not self._closed:
            self._refresher = asyncio.create_task(
                self._refresh_ahead(), name="msk-iam-token-refresher"
            )
        return token

    def refused(self) -> None:
        """A broker refused a sign-in with the current token: the next connection gets a token
        signed afresh, so that fixed or rotated credentials take effect without a restart (a
        token signed with revoked credentials never gets better; a policy fix would not need
        it, and costs one signing per join attempt meanwhile)."""
        self._token = None

    async def close(self) -> None:
        """Stops background refreshing; later token() calls still work, signing on demand."""
        self._closed = True
        tasks = [t for t in (self._refresher, self._signing) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._refresher = None

    def _stale_at(self) -> float:
        return self.expires_at - self._margin

    async def _refresh(self) -> str:
        """Signs a new token, or joins the signing already in flight."""
        if self._signing is None:
            self._signing = asyncio.create_task(self._sign())
            self._signing.add_done_callback(self._signing_done)
        # Shielded: a caller giving up (aiokafka's connect timeout) must not cancel the
        # signing that the other callers are waiting on.
        return await asyncio.shield(self._signing)

    def _signing_done(self, task: asyncio.Task[str]) -> None:
        self._signing = None
        if not task.cancelled():
            task.exception()  # retrieved here in case every waiter was cancelled

    async def _sign(self) -> str:
        try:
            signed = await asyncio.get_running_loop().run_in_executor(None, self._sign_blocking)
        except AuthError:
            self.failures += 1
            raise
        except Exception as e:
            self.failures += 1
            # Anything else would escape aiokafka's connect and kill its background tasks.
            log.exception("kafka.aws: unexpected error while signing an MSK IAM token")
            raise AuthError(
                f"kafka.aws: could not sign an MSK IAM token ({type(e).__name__}: {_one_line(e)})"
            ) from e
        self._token, self.expires_at = signed.token, signed.expires_at
        self.signed_with = (
            f"access key {signed.access_key_id} ({self._source()}), region {signed.region}"
        )
        self.refreshes += 1
        log.info(
            "kafka.aws: new MSK IAM token from %s, valid until %s",
            self._source(),
            datetime.fromtimestamp(signed.expires_at, UTC).isoformat(timespec="seconds"),
        )
        return signed.token

    async def _refresh_ahead(self) -> None:
        failures = 0
        while True:
            if failures:
                delay = min(_RETRY_BASE_S * 2 ** (failures - 1), _RETRY_MAX_S)
            else:
                delay = max(self._stale_at() - self._clock(), _MIN_REFRESH_DELAY_S)
            await asyncio.sleep(delay)
            if self._clock() < self._stale_at():
                failures = 0  # a token() caller refreshed meanwhile
                continue
            try:
                await self._refresh()
            except AuthError as e:
                failures += 1
                log.warning("background MSK IAM token refresh failed (attempt %d): %s", failures, e)
            else:
                failures = 0

    def _source(self) -> str:
        base = self._base_credentials()
        return f"role {self._aws.role_arn} assumed with {base}" if self._aws.role_arn else base

    def _base_credentials(self) -> str:
        aws = self._aws
        return f"profile {aws.profile!r}" if aws.profile else "the default credential chain"

    def _sign_blocking(self) -> _Signed:
        credentials, credentials_expire_at, region = self._credentials()
        token, expiry_ms = MSKAuthTokenProvider.generate_auth_token_from_credentials_provider(
            region, _Resolved(credentials)
        )
        expires_at = expiry_ms / 1000
        if credentials_expire_at is not None:
            # The signature is only as good as the (temporary) credentials behind it.
            expires_at = min(expires_at, credentials_expire_at)
        return _Signed(str(token), expires_at, credentials.access_key, region)

    def _credentials(self) -> tuple[Credentials, float | None, str]:
        """Resolves credentials afresh, as the signer's own entry points do, but with errors
        that name the config key (the signer's default-chain and profile entry points fail on
        missing credentials with an AttributeError), and AssumeRole with the configured region
        and profile (the signer's role-ARN entry point takes neither, and assumes the role with
        boto3's process-wide default session)."""
        aws = self._aws
        try:
            session = botocore.session.Session(profile=aws.profile)
            region = aws.region or session.get_config_variable("region")
            source = session.get_credentials()
            frozen = source.get_frozen_credentials() if source is not None else None
        except ProfileNotFound as e:
            raise AuthError(
                f"kafka.aws.profile: AWS profile {aws.profile!r} not found in the shared "
                "config/credentials files; fix kafka.aws.profile, or point AWS_CONFIG_FILE / "
                "AWS_SHARED_CREDENTIALS_FILE at the files that define it"
            ) from e
        except BotoCoreError as e:
            raise AuthError(f"kafka.aws: could not load AWS credentials ({_one_line(e)})") from e
        if frozen is None or not frozen.access_key or not frozen.secret_key:
            raise AuthError(self._no_credentials_message())
        if not region:
            raise AuthError("kafka.aws.region: no AWS region; set kafka.aws.region or AWS_REGION")
        # Temporary credentials (IMDS, IRSA, Pod Identity, SSO) come as RefreshableCredentials,
        # which keep their expiry in an attribute that has no public accessor.
        expires_at = getattr(source, "_expiry_time", None)
        credentials = Credentials(frozen.access_key, frozen.secret_key, frozen.token)
        if aws.role_arn is None:
            return credentials, _epoch(expires_at), region
        return (*self._assume_role(session, credentials, region), region)

    def _assume_role(
        self, session: Any, credentials: Credentials, region: str
    ) -> tuple[Credentials, float | None]:
        role_arn = self._aws.role_arn
        try:
            sts = session.create_client(
                "sts",
                region_name=region,
                config=_STS_CONFIG,
                aws_access_key_id=credentials.access_key,
                aws_secret_access_key=credentials.secret_key,
                aws_session_token=credentials.token,
            )
            assumed = sts.assume_role(
                RoleArn=role_arn, RoleSessionName=self._aws.role_session_name
            )["Credentials"]
        except ClientError as e:
            error = e.response.get("Error", {})
            raise AuthError(
                f"kafka.aws.role_arn: AssumeRole of {role_arn} with {self._base_credentials()} "
                f"failed: {error.get('Code')}: {_one_line(error.get('Message', ''))}; check the "
                "role's trust policy and the permissions of the credentials assuming it"
            ) from e
        except BotoCoreError as e:
            raise AuthError(
                f"kafka.aws.role_arn: AssumeRole of {role_arn} failed ({_one_line(e)})"
            ) from e
        return (
            Credentials(
                assumed["AccessKeyId"], assumed["SecretAccessKey"], assumed["SessionToken"]
            ),
            _epoch(assumed.get("Expiration")),
        )

    def _no_credentials_message(self) -> str:
        aws = self._aws
        if aws.profile:
            return (
                f"kafka.aws.profile: AWS profile {aws.profile!r} has no credentials; add them "
                "to the profile or choose another kafka.aws.profile"
            )
        if aws.role_arn:
            return (
                f"kafka.aws: no AWS credentials found to assume kafka.aws.role_arn with "
                f"({_CHAIN}); set kafka.aws.profile, or provide credentials"
            )
        return (
            f"kafka.aws: no AWS credentials found ({_CHAIN}); set kafka.aws.profile or "
            "kafka.aws.role_arn, or provide credentials"
        )


def _epoch(when: object) -> float | None:
    # botocore gives expiry times as aware datetimes; the ones it does not know are None.
    return when.timestamp() if isinstance(when, datetime) else None


def _one_line(error: object) -> str:
    return " ".join(str(error).split())
