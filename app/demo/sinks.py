"""What `spacebell demo` delivers to: an SMTP server that saves .eml files and a verifying webhook receiver."""

from __future__ import annotations

import email
import email.policy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session
from aiosmtpd.smtp import SMTP as SMTPServer
from standardwebhooks import Webhook, WebhookVerificationError


class MailDrop:
    """An SMTP server on loopback that writes every message it accepts to `<folder>/<n>.eml`."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.count = 0
        self.subjects: list[str] = []
        self.bodies: list[str] = []
        self._controller = Controller(self, hostname="127.0.0.1", port=port)

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.count += 1
        raw = envelope.original_content or envelope.content or b""
        raw = raw if isinstance(raw, bytes) else raw.encode()
        (self.folder / f"{self.count:05d}.eml").write_bytes(raw)
        message = email.message_from_bytes(raw, policy=email.policy.default)
        self.subjects.append(str(message.get("Subject", "")))
        body = message.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
        self.bodies.append(body.get_content() if body is not None else "")
        return "250 OK saved"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


@dataclass
class DemoReceiver:
    """A webhook endpoint on loopback that verifies each Standard Webhooks signature and keeps a tally."""

    port: int
    secret: str = ""
    received: int = 0
    verified: int = 0
    unique_ids: set[str] = field(default_factory=set)
    last: list[dict[str, Any]] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received += 1
        try:
            payload = Webhook(self.secret).verify(body, dict(request.headers))
        except (WebhookVerificationError, ValueError):
            return web.Response(status=400, text="bad signature")
        self.verified += 1
        self.unique_ids.add(request.headers.get("webhook-id", ""))
        self.last = ([payload] + self.last)[:20]
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/webhook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def payload_summary(payload: dict[str, Any]) -> str:
    data = payload.get("data", {})
    space = data.get("space", {})
    return json.dumps({"type": payload.get("type"), "title": space.get("title")}, ensure_ascii=False)
