"""`spacebell` command line: run roles, manage the database and accounts, run the X simulator."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from app.core.settings import SettingsError, get_settings


def _settings():  # type: ignore[no-untyped-def]
    try:
        return get_settings()
    except SettingsError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Spacebell: reminders before Twitter/X Spaces start, by webhook and email."""


# ---- database -----------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default head)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from app.core import migrate

    async def run() -> None:
        engine = create_async_engine(_settings().database_url)
        try:
            await migrate.upgrade(engine, revision)
            click.echo(f"database at {await migrate.current_revision(engine)}")
        finally:
            await engine.dispose()

    asyncio.run(run())


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (`base` empties the database)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from app.core import migrate

    async def run() -> None:
        engine = create_async_engine(_settings().database_url)
        try:
            await migrate.downgrade(engine, revision)
        finally:
            await engine.dispose()

    asyncio.run(run())


# ---- accounts -----------------------------------------------------------------------------------


@main.group()
def accounts() -> None:
    """Tenants and their API keys."""


def _with_write_session(fn: Any) -> Any:
    from app.core import migrate
    from app.core.clock import SystemClock
    from app.core.db import Database

    async def run() -> Any:
        settings = _settings()
        database = Database(settings.database_url)
        try:
            if settings.migrate_on_start:
                await migrate.upgrade(database.engine)
            async with database.write() as session:
                return await fn(session, SystemClock().now())
        finally:
            await database.dispose()

    return asyncio.run(run())


@accounts.command("create")
@click.argument("name")
def accounts_create(name: str) -> None:
    """Create an account; the API key is printed alone on the last line."""
    from app.accounts.service import create_account

    issued = _with_write_session(lambda s, now: create_account(s, name, now))
    click.echo(f"account {issued.account_id} created; API key {issued.key_id} (shown once):", err=False)
    click.echo(issued.api_key)


@accounts.command("issue-key")
@click.argument("account_id")
def accounts_issue_key(account_id: str) -> None:
    """Issue another API key for ACCOUNT_ID (printed alone on the last line)."""
    from app.accounts.models import Account
    from app.accounts.service import issue_key

    async def issue(session, now):  # type: ignore[no-untyped-def]
        if await session.get(Account, account_id) is None:
            raise click.ClickException(f"no account {account_id}")
        return await issue_key(session, account_id, now)

    issued = _with_write_session(issue)
    click.echo(f"API key {issued.key_id} for {account_id} (shown once):")
    click.echo(issued.api_key)


@accounts.command("revoke-key")
@click.argument("key")
def accounts_revoke_key(key: str) -> None:
    """Revoke an API key, given as the full key, its prefix or its key id."""
    from app.accounts.service import revoke_key

    count = _with_write_session(lambda s, now: revoke_key(s, key, now))
    if not count:
        raise click.ClickException("no live key matches")
    click.echo(f"revoked {count} key(s)")


# ---- roles --------------------------------------------------------------------------------------


def _run_roles(roles: set[str], *, simulate: bool = False, host: str | None = None, port: int | None = None) -> None:
    from app.roles import run_roles

    settings = _settings()
    try:
        asyncio.run(run_roles(settings, roles, simulate=simulate, host=host, port=port))
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        click.echo(f"spacebell: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.option("--simulate", is_flag=True, help="Run against a local X API simulator instead of X.")
@click.option("--host", default=None, help="Bind address (default SPACEBELL_API_HOST).")
@click.option("--port", type=int, default=None, help="Port (default SPACEBELL_API_PORT).")
def serve(simulate: bool, host: str | None, port: int | None) -> None:
    """API, discovery and dispatcher in one process (the embedded default)."""
    _run_roles({"api", "scheduler", "worker"}, simulate=simulate, host=host, port=port)


@main.command()
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
def api(host: str | None, port: int | None) -> None:
    """The HTTP API only."""
    _run_roles({"api"}, host=host, port=port)


@main.command()
def worker() -> None:
    """The dispatcher only (run several on PostgreSQL)."""
    _run_roles({"worker"})


@main.command()
@click.option("--simulate", is_flag=True, help="Poll a local X API simulator instead of X.")
def scheduler(simulate: bool) -> None:
    """Discovery only (one leader at a time across processes)."""
    _run_roles({"scheduler"}, simulate=simulate)
@main.command()
@click.option("--duration", type=float, default=None, help="Stop by itself after this many seconds.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port of the API.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("demo-data"), show_default=True,
              help="Where the SQLite database and the .eml files go (emptied at start).")
def demo(duration: float | None, port: int, data_dir: Path) -> None:
    """Everything in one process against a simulated X: watch reminders go out by webhook and email."""
    from app.demo.run import run_demo

    try:
        asyncio.run(run_demo(data_dir=data_dir, port=port, duration=duration))
    except KeyboardInterrupt:
        pass


@main.command("x-sim")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8787, show_default=True)
@click.option("--bearer-token", default="sim-token", show_default=True, help="Token the simulator accepts.")
@click.option("--seed", type=int, default=None, help="Seed for the generated creators and Spaces.")
@click.option("--creators", type=int, default=0, show_default=True, help="Creators to generate.")
@click.option("--spaces-per-creator", type=int, default=3, show_default=True)
@click.option("--soon", type=int, default=0, show_default=True, help="Spaces starting within --soon-minutes.")
@click.option("--soon-minutes", type=float, default=30.0, show_default=True)
@click.option("--gone-mode", type=click.Choice(["state", "not_found"]), default="state", show_default=True,
              help="How ended/canceled Spaces answer id lookups.")
@click.option("--requests-per-window", type=int, default=300, show_default=True)
@click.option("--window-seconds", type=float, default=900, show_default=True)
def x_sim(host: str, port: int, bearer_token: str, seed: int | None, creators: int, spaces_per_creator: int,
          soon: int, soon_minutes: float, gone_mode: str, requests_per_window: int, window_seconds: float) -> None:
    """A local X API simulator (X's Spaces and users endpoints, plus an admin API under /_sim)."""
    from app.x.sim.server import serve_sim

    try:
        asyncio.run(serve_sim(
            host, port, bearer_token=bearer_token, seed=seed, seed_creators=creators,
            spaces_per_creator=spaces_per_creator, soon=soon, soon_within_minutes=soon_minutes,
            gone_mode=gone_mode, requests_per_window=requests_per_window,  # type: ignore[arg-type]
            window_seconds=window_seconds,
        ))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
