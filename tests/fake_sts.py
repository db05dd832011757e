"""A local stand-in for the AWS services that hand out temporary credentials, so those
credential sources run end to end without AWS.

- STS AssumeRole (point botocore at it with ``AWS_ENDPOINT_URL_STS``): the query protocol just
  far enough for AssumeRole; each call is recorded, including which access key signed it.
- The container credentials endpoint that EKS Pod Identity and ECS task roles use (point
  botocore at ``container_credentials_url`` with ``AWS_CONTAINER_CREDENTIALS_FULL_URI``).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
DUMMY_SESSION_TOKEN = "FakeSessionToken/kafka-sidecar-tests"


@dataclass(frozen=True)
class AssumeRoleCall:
    role_arn: str
    role_session_name: str
    signed_by: str
    """The access key id in the request's SigV4 Authorization header."""


@dataclass
class FakeSts:
    """Hands out ``access_key_id``/``secret_access_key`` plus a dummy session token, valid for
    ``lifetime``; or, with ``deny`` set, refuses every AssumeRole with AccessDenied."""

    CONTAINER_CREDENTIALS_PATH = "/container-credentials"

    access_key_id: str
    secret_access_key: str
    session_token: str = DUMMY_SESSION_TOKEN
    lifetime: timedelta = timedelta(hours=1)
    deny: bool = False
    calls: list[AssumeRoleCall] = field(default_factory=list)
    url: str = ""

    @contextmanager
    def serving(self) -> Iterator[FakeSts]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        thread = threading.Thread(target=server.serve_forever, name="fake-sts", daemon=True)
        thread.start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    @property
    def container_credentials_url(self) -> str:
        return self.url + self.CONTAINER_CREDENTIALS_PATH

    def _expiration(self) -> str:
        return (datetime.now(UTC) + self.lifetime).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _container_credentials(self) -> str:
        return json.dumps(
            {
                "AccessKeyId": self.access_key_id,
                "SecretAccessKey": self.secret_access_key,
                "Token": self.session_token,
                "Expiration": self._expiration(),
            }
        )

    def _respond(self, form: dict[str, str], authorization: str) -> tuple[int, str]:
        if form.get("Action") != "AssumeRole":
            return 400, _error("InvalidAction", f"not faked: {form.get('Action')}")
        match = re.search(r"Credential=([^/]+)/", authorization)
        self.calls.append(
            AssumeRoleCall(
                role_arn=form.get("RoleArn", ""),
                role_session_name=form.get("RoleSessionName", ""),
                signed_by=match.group(1) if match else "",
            )
        )
        if self.deny:
            return 403, _error(
                "AccessDenied",
                f"User is not authorized to perform: sts:AssumeRole on resource: "
                f"{form.get('RoleArn')}",
            )
        return 200, (
            f'<AssumeRoleResponse xmlns="{_NS}"><AssumeRoleResult>'
            f"<Credentials><AccessKeyId>{escape(self.access_key_id)}</AccessKeyId>"
            f"<SecretAccessKey>{escape(self.secret_access_key)}</SecretAccessKey>"
            f"<SessionToken>{escape(self.session_token)}</SessionToken>"
            f"<Expiration>{self._expiration()}</Expiration></Credentials>"
            f"<AssumedRoleUser><AssumedRoleId>AROAFAKE:{escape(form.get('RoleSessionName', ''))}"
            f"</AssumedRoleId><Arn>{escape(form.get('RoleArn', ''))}</Arn></AssumedRoleUser>"
            "</AssumeRoleResult><ResponseMetadata><RequestId>fake</RequestId>"
            "</ResponseMetadata></AssumeRoleResponse>"
        )

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sts = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                status, xml = sts._respond(
                    dict(parse_qsl(body)), self.headers.get("Authorization", "")
                )
                self._send(status, "text/xml", xml)

            def do_GET(self) -> None:
                if self.path == sts.CONTAINER_CREDENTIALS_PATH:
                    self._send(200, "application/json", sts._container_credentials())
                else:
                    self._send(404, "text/plain", "not faked")

            def _send(self, status: int, content_type: str, body: str) -> None:
                payload = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep the test output to what the tests print

        return Handler


def _error(code: str, message: str) -> str:
    return (
        f'<ErrorResponse xmlns="{_NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{escape(message)}</Message></Error><RequestId>fake</RequestId>"
        "</ErrorResponse>"
    )
