"""The links in mail: confirm an address, unsubscribe (RFC 8058 one-click). No API key: the token is the proof.

GET only shows a page with a button (mail scanners prefetch links); POST does the change, answers
200 at once and never redirects.
"""

from __future__ import annotations

import html

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse

from app.core.deps import CtxDep, SessionDep
from app.core.secrets import link_signing_key
from app.delivery import consent
from app.delivery.links import LinkClaim, sign_link, verify_link
from app.delivery.models import EmailRecipient
from app.delivery.outbox import outbox_for, wake_dispatcher_after_commit
from app.subscriptions.models import Subscription

router = APIRouter(prefix="/v1/email", include_in_schema=False)

Token = Path(min_length=10, max_length=400)

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1"><meta name="robots" content="noindex">
<title>{title}</title></head><body style="font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto">
<h1>{title}</h1><p>{text}</p>{form}</body></html>"""


def _page(
    title: str, text: str, button: str | None = None, status: int = 200, extra: tuple[str, str] | None = None
) -> HTMLResponse:
    form = f'<form method="post"><button type="submit">{html.escape(button)}</button></form>' if button else ""
    if extra is not None:
        action, label = extra
        form += f'<form method="post" action="{html.escape(action)}"><button type="submit">{html.escape(label)}</button></form>'

    return HTMLResponse(
        _PAGE.format(title=html.escape(title), text=html.escape(text), form=form),
        status_code=status,
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


def _invalid() -> HTMLResponse:
    return _page("Link not valid", "This link is not valid. Nothing was changed.", status=404)


async def _claim(ctx: CtxDep, session: SessionDep, token: str, purpose: str) -> tuple[LinkClaim, EmailRecipient] | None:
    claim = verify_link(await link_signing_key(ctx), token, purpose)
    if claim is None:
        return None
    recipient = await session.get(EmailRecipient, claim.recipient_id)
    if recipient is None:
        return None
    if claim.scope != consent.ALL:
        sub = await session.get(Subscription, claim.scope)
        if sub is None or sub.email_recipient_id != recipient.id:
            return None
    return claim, recipient


@router.get("/confirm/{token}")
async def confirm_page(ctx: CtxDep, session: SessionDep, token: str = Token) -> HTMLResponse:
    found = await _claim(ctx, session, token, "confirm")
    if found is None:
        return _invalid()
    return _page(
        "Confirm your address",
        f"Press the button to receive Space reminders at {found[1].address}. If you did not ask for them, "
        "close this page: nothing will be sent.",
        "Confirm",
    )


@router.post("/confirm/{token}")
async def confirm(ctx: CtxDep, session: SessionDep, token: str = Token) -> HTMLResponse:
    found = await _claim(ctx, session, token, "confirm")
    if found is None:
        return _invalid()
    await consent.confirm_address(session, found[1], outbox_for(ctx), ctx.clock.now())
    wake_dispatcher_after_commit(session, ctx)
    return _page("Address confirmed", f"Reminders will now be sent to {found[1].address}.")


@router.get("/unsubscribe/{token}")
async def unsubscribe_page(ctx: CtxDep, session: SessionDep, token: str = Token) -> HTMLResponse:
    found = await _claim(ctx, session, token, "unsubscribe")
    if found is None:
        return _invalid()
    claim, recipient = found
    if claim.scope == consent.ALL:
        return _page("Unsubscribe", f"Press the button to stop all reminders from this sender to {recipient.address}.",
                     "Unsubscribe from everything")
    # Whoever holds this link holds the mailbox: offer leaving everything this sender sends, too.
    everything = sign_link(await link_signing_key(ctx), LinkClaim("unsubscribe", recipient.id, consent.ALL))
    return _page(
        "Unsubscribe", f"Stop these reminders to {recipient.address}, or everything this sender mails there.",
        "Unsubscribe from these reminders", extra=(f"{ctx.settings.public_base_url}/v1/email/unsubscribe/{everything}",
                                                   "Unsubscribe from everything"),
    )


@router.post("/unsubscribe/{token}")
async def unsubscribe(request: Request, ctx: CtxDep, session: SessionDep, token: str = Token) -> HTMLResponse:
    found = await _claim(ctx, session, token, "unsubscribe")
    if found is None:
        return _invalid()
    claim, recipient = found
    await consent.unsubscribe(session, recipient, claim.scope, outbox_for(ctx), ctx.clock.now())
    return _page("Unsubscribed", f"No more {'of these ' if claim.scope != consent.ALL else ''}reminders will be sent to {recipient.address}.")
