"""Local stand-ins for the outside world that delivery talks to: a webhook receiver and an SMTP server.

Both listen on 127.0.0.1 on a free port and record what they get, so tests can assert on real
bytes on the wire. Typical use::

    async with WebhookReceiver(secret) as receiver:
        receiver.respond_with([500, Reply(429, retry_after=7), 200])
        ... deliver to receiver.url (exempt 127.0.0.0/8 from the egress policy) ...
        [first, second, third] = await receiver.wait_for(3)
        assert first.verified and first.webhook_id == third.webhook_id

    async with SmtpCapture() as smtp:
        smtp.fail_with(451, stage="RCPT", times=1)
        ... send to smtp.host / smtp.port ...
        [message] = await smtp.wait_for(1)          # email.message.EmailMessage
        await smtp.stop(); ...; await smtp.start()  # down, then back up on the same port

`make_tls_files(directory)` writes a self-signed certificate for 127.0.0.1/localhost (needs the
`openssl` command) for tests of https webhooks, STARTTLS and implicit TLS.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hmac
import json
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from aiosmtpd.smtp import SMTP as SMTPServer
from standardwebhooks import Webhook, WebhookVerificationError

__all__ = [
    "CapturedMail",
    "ReceivedWebhook",
    "Reply",
    "SmtpCapture",
    "WebhookReceiver",
    "client_ssl_context",
    "free_port",
    "make_tls_files",
    "server_ssl_context",
]

DEFAULT_WAIT_SECONDS = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# TLS material


def make_tls_files(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed EC certificate for 127.0.0.1 and localhost; returns (cert.pem, key.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "2",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(key), "-out", str(cert),
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def client_ssl_context(cert: Path) -> ssl.SSLContext:
    """A verifying client context that trusts only the given self-signed certificate."""
    return ssl.create_default_context(cafile=str(cert))


# ---------------------------------------------------------------------------------------------
# Webhooks


@dataclass(frozen=True)
class Reply:
    """One scripted answer. `delay` seconds pass before answering (to provoke client timeouts);
    `retry_after` becomes a Retry-After header; a 3xx gets a Location unless `headers` has one;
    `drop=True` closes the TCP connection without any answer (connection lost)."""

    status: int = 200
    body: bytes | str = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    retry_after: int | str | None = None
    drop: bool = False


@dataclass
class ReceivedWebhook:
    webhook_id: str | None
    timestamp: int | None  # webhook-timestamp as sent (this attempt's time)
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: Any  # parsed body, or None if it was not JSON
    verified: bool  # signature checked with standardwebhooks against the path's secret
    path: str = "/hook"
    verify_error: str | None = None
    peer: tuple[str, int] | None = None  # client address and port: one per TCP connection
    status: int = 200  # what the receiver answered
    received_at: float = 0.0  # time.monotonic() on arrival


SecretSpec = str | Sequence[str] | None


class WebhookReceiver:
    """An aiohttp server that accepts POSTs on any path, verifies Standard Webhooks signatures,
    records every request in `received` and answers from a script (default: 200).

    Secrets: `secret` applies to every path; `secrets[path]` overrides it per path (assignable
    after start). A list of secrets verifies if any matches (rotation). With
    `check_timestamp=False` only the signature is checked, not the ±5 minute window — use it
    when the sender's clock is a ManualClock. `reject_unverified=True` answers 401 to requests
    whose signature does not verify (they are still recorded).
    """

    def __init__(
        self,
        secret: SecretSpec = None,
        *,
        secrets: Mapping[str, SecretSpec] | None = None,
        path: str = "/hook",
        host: str = "127.0.0.1",
        port: int = 0,
        check_timestamp: bool = True,
        reject_unverified: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.secret = secret
        self.secrets: dict[str, SecretSpec] = dict(secrets or {})
        self.path = path
        self.host = host
        self.port = port
        self.check_timestamp = check_timestamp
        self.reject_unverified = reject_unverified
        self.ssl_context = ssl_context
        self.default_reply = Reply(200, b"ok")
        self.received: list[ReceivedWebhook] = []
        self._script: deque[Reply] = deque()
        self._path_scripts: dict[str, deque[Reply]] = {}
        self._fail_every_other: Reply | None = None
        self._requests_seen = 0
        self._arrived = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> WebhookReceiver:
        """Listen (again) — on `port`, or on a free port the first time; the port is kept for restarts."""
        if self._runner is not None:
            return self
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._stopping = asyncio.Event()
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            self._stopping.set()  # cut short scripted delays so shutdown is quick
            await runner.cleanup()

    async def __aenter__(self) -> WebhookReceiver:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """e.g. http://127.0.0.1:PORT/hook"""
        return self.url_for(self.path)

    def url_for(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    # -- scripting -------------------------------------------------------------------------

    def respond_with(self, replies: Iterable[int | Reply], *, path: str | None = None) -> None:
        """Answer the next requests (to `path`, or to any path) with these, then fall back to the default."""
        queue = deque(r if isinstance(r, Reply) else Reply(r) for r in replies)
        if path is None:
            self._script.extend(queue)
        else:
            self._path_scripts.setdefault(path, deque()).extend(queue)

    def fail_every_other(self, reply: int | Reply = 500) -> None:
        """From now on alternate: the 1st, 3rd, 5th … request gets `reply`, the others the default."""
        self._fail_every_other = reply if isinstance(reply, Reply) else Reply(reply)
        self._requests_seen = 0

    def reset(self) -> None:
        """Forget recorded requests and any script."""
        self.received.clear()
        self._script.clear()
        self._path_scripts.clear()
        self._fail_every_other = None
        self._requests_seen = 0

    # -- inspection ------------------------------------------------------------------------

    def received_on(self, path: str) -> list[ReceivedWebhook]:
        return [r for r in self.received if r.path == path]

    @property
    def webhook_ids(self) -> list[str | None]:
        return [r.webhook_id for r in self.received]

    @property
    def connection_count(self) -> int:
        """Distinct client TCP connections seen (by peer address and port)."""
        return len({r.peer for r in self.received if r.peer is not None})

    async def wait_for(
        self, count: int, timeout: float = DEFAULT_WAIT_SECONDS, *, path: str | None = None
    ) -> list[ReceivedWebhook]:
        """Wait until at least `count` requests (to `path`, if given) arrived; returns them all."""

        def matching() -> list[ReceivedWebhook]:
            return self.received if path is None else self.received_on(path)

        deadline = time.monotonic() + timeout
        while len(matching()) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {count} webhook(s){f' on {path}' if path else ''} within {timeout}s, "
                    f"got {len(matching())}"
                )
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass
        return list(matching())

    async def assert_no_more(self, count: int, within: float = 0.2, *, path: str | None = None) -> None:
        """Assert that no request beyond `count` arrives during `within` seconds (no duplicates)."""
        await asyncio.sleep(within)
        got = len(self.received if path is None else self.received_on(path))
        assert got == count, f"expected exactly {count} webhook(s), got {got}"

    # -- server ----------------------------------------------------------------------------

    def _next_reply(self, path: str) -> Reply:
        path_script = self._path_scripts.get(path)
        if path_script:
            return path_script.popleft()
        if self._script:
            return self._script.popleft()
        if self._fail_every_other is not None:
            self._requests_seen += 1
            if self._requests_seen % 2 == 1:
                return self._fail_every_other
        return self.default_reply

    def _verify(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[bool, str | None]:
        spec = self.secrets.get(path, self.secret)
        if not spec:
            return False, "no secret configured for this path"
        candidates = [spec] if isinstance(spec, str) else list(spec)
        error = "no secret matched"
        for candidate in candidates:
            try:
                if self.check_timestamp:
                    Webhook(candidate).verify(body, headers)
                    return True, None
                if _signature_matches(candidate, body, headers):
                    return True, None
            except WebhookVerificationError as exc:
                error = str(exc)
        return False, error

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified, verify_error = self._verify(request.path, body, headers)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        timestamp = headers.get("webhook-timestamp")
        reply = self._next_reply(request.path)
        status = 401 if self.reject_unverified and not verified else reply.status
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.received.append(
            ReceivedWebhook(
                webhook_id=headers.get("webhook-id"),
                timestamp=int(timestamp) if timestamp and timestamp.isdigit() else None,
                headers=headers,
                body=body,
                json=parsed,
                verified=verified,
                path=request.path,
                verify_error=verify_error,
                peer=tuple(peer[:2]) if peer else None,
                status=status,
                received_at=time.monotonic(),
            )
        )
        self._arrived.set()
        if reply.delay > 0:
            try:
                await asyncio.wait_for(self._stopping.wait(), reply.delay)
            except TimeoutError:
                pass
        if reply.drop and request.transport is not None:
            request.transport.close()
            return web.Response(status=status)  # never reaches the client
        response_headers = dict(reply.headers)
        if reply.retry_after is not None:
            response_headers["Retry-After"] = str(reply.retry_after)
        if 300 <= status < 400 and "Location" not in response_headers:
            response_headers["Location"] = self.url_for("/redirected")
        payload = reply.body.encode() if isinstance(reply.body, str) else reply.body
        if status == 401 and status != reply.status:
            payload = b"signature did not verify"
        return web.Response(status=status, body=payload, headers=response_headers)


def _signature_matches(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    """The HMAC check of standardwebhooks without its ±5 minute timestamp window."""
    msg_id, stamp, signatures = (headers.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and stamp and stamp.isdigit() and signatures):
        raise WebhookVerificationError("Missing required headers")
    expected = Webhook(secret).sign(msg_id, datetime.fromtimestamp(int(stamp), tz=UTC), body.decode())
    if any(hmac.compare_digest(expected.encode(), s.encode()) for s in signatures.split(" ")):
        return True
    raise WebhookVerificationError("No matching signature found")


# ---------------------------------------------------------------------------------------------
# SMTP


@dataclass
class CapturedMail:
    message: EmailMessage
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    peer: tuple[str, int] | None  # one per SMTP connection


@dataclass
class _Failure:
    code: int
    stage: str
    remaining: int | None  # None: until cleared
    text: str


_FAILURE_TEXT = {
    421: "4.3.2 Service shutting down",
    450: "4.2.0 Mailbox busy, try again later",
    451: "4.3.0 Temporary failure, try again later",
    452: "4.3.1 Insufficient system storage",
    550: "5.1.1 Mailbox unavailable",
    552: "5.3.4 Message too big",
    554: "5.7.1 Message rejected",
}


class _CaptureHandler:
    def __init__(self, capture: SmtpCapture) -> None:
        self.capture = capture

    async def handle_MAIL(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self.capture._note_peer(session.peer)
        if self.capture.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        failure = self.capture._take_failure("RCPT")
        if failure is not None:
            return failure
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        failure = self.capture._take_failure("DATA")
        if failure is not None:
            return failure
        raw = envelope.original_content or envelope.content
        raw = raw if isinstance(raw, bytes) else raw.encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        peer = tuple(session.peer[:2]) if session.peer else None
        self.capture._record(
            CapturedMail(message, envelope.mail_from or "", list(envelope.rcpt_tos), raw, peer)  # type: ignore[arg-type]
        )
        return "250 2.0.0 Message accepted for delivery"


class SmtpCapture:
    """An aiosmtpd server on 127.0.0.1 that parses every accepted message into `.messages`.

    `await stop()` then `await start()` brings it down and back up on the same port (SMTP down,
    then up). `fail_with(451|550, stage="DATA"|"RCPT", times=n)` answers the next n attempts at
    that stage with that code (times=None: until `clear_failures()`). `auth=(user, password)`
    requires AUTH (allowed without TLS, for tests). `tls="starttls"` requires STARTTLS and
    `tls="implicit"` wraps the socket in TLS, both with `ssl_context`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        auth: tuple[str, str] | None = None,
        tls: str = "none",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError("tls must be none, starttls or implicit")
        if tls != "none" and ssl_context is None:
            raise ValueError("TLS needs an ssl_context (see make_tls_files / server_ssl_context)")
        self.host = host
        self.port = port or free_port(host)
        self.auth = auth
        self.tls = tls
        self.ssl_context = ssl_context
        self.mails: list[CapturedMail] = []
        self.refused: list[tuple[str, int]] = []  # (stage, code) of every scripted refusal
        self._peers: set[tuple[str, int]] = set()
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> SmtpCapture:
        if self._controller is None:
            # A Controller's loop is closed by stop(), so every start builds a new one.
            controller = self._build_controller()
            await asyncio.to_thread(controller.start)
            self._controller = controller
        return self

    async def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            await asyncio.to_thread(controller.stop)

    @property
    def running(self) -> bool:
        return self._controller is not None

    async def __aenter__(self) -> SmtpCapture:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _build_controller(self) -> Controller:
        kwargs: dict[str, Any] = {"enable_SMTPUTF8": True}
        if self.auth is not None:
            # AUTH without TLS so tests need no certificates; handle_MAIL enforces it (aiosmtpd's own
            # auth_required would warn on every connection).
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False)
        if self.tls == "starttls":
            kwargs.update(tls_context=self.ssl_context, require_starttls=True)
        elif self.tls == "implicit":
            kwargs.update(ssl_context=self.ssl_context)
        return Controller(_CaptureHandler(self), hostname=self.host, port=self.port, **kwargs)

    def _authenticate(
        self, server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if self.auth is not None and isinstance(auth_data, LoginPassword):
            user, password = self.auth
            if auth_data.login == user.encode() and auth_data.password == password.encode():
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    # -- scripting -------------------------------------------------------------------------

    def fail_with(self, code: int, *, stage: str = "DATA", times: int | None = 1, text: str | None = None) -> None:
        """Refuse the next `times` RCPT or DATA commands with `code` (times=None: every one)."""
        stage = stage.upper()
        if stage not in ("RCPT", "DATA"):
            raise ValueError("stage must be RCPT or DATA")
        with self._lock:
            self._failures.append(_Failure(code, stage, times, text or _FAILURE_TEXT.get(code, "Refused")))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _take_failure(self, stage: str) -> str | None:
        with self._lock:
            for failure in self._failures:
                if failure.stage != stage:
                    continue
                if failure.remaining is not None:
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                self.refused.append((stage, failure.code))
                return f"{failure.code} {failure.text}"
        return None

    # -- inspection ------------------------------------------------------------------------

    def _note_peer(self, peer: Any) -> None:
        if peer:
            with self._lock:
                self._peers.add(tuple(peer[:2]))

    def _record(self, mail: CapturedMail) -> None:
        with self._lock:
            self.mails.append(mail)

    @property
    def messages(self) -> list[EmailMessage]:
        with self._lock:
            return [m.message for m in self.mails]

    @property
    def connection_count(self) -> int:
        """Distinct client connections that started a mail transaction (the start-up probe is not one)."""
        with self._lock:
            return len(self._peers)

    def reset(self) -> None:
        with self._lock:
            self.mails.clear()
            self.refused.clear()
            self._peers.clear()
            self._failures.clear()

    async def wait_for(self, count: int, timeout: float = DEFAULT_WAIT_SECONDS) -> list[EmailMessage]:
        """Wait until at least `count` messages were accepted; returns them all."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise AssertionError(f"expected {count} message(s) within {timeout}s, got {len(messages)}")
            await asyncio.sleep(0.01)  # the server runs in its own thread; polling is simplest
