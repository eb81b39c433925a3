"""The ``multimail`` command: serve, init, db, keys, mailbox, audit."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated, Any

import typer

from multimail import cli_agent
from multimail.cli_proof import audit_app, rotate_signing_command, verify_command
from multimail.config import Settings, load_settings
from multimail.errors import MultimailError
from multimail.services import accounts, keys, mailboxes
from multimail.services.context import Actor, Services

app = typer.Typer(help="MultiMail: email for AI agents with human oversight.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of the local account.", no_args_is_help=True)
mailbox_app = typer.Typer(help="Mailboxes of the local account.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(mailbox_app, name="mailbox")
app.add_typer(audit_app, name="audit")
user_app = typer.Typer(help="Dashboard operators of the local account.", no_args_is_help=True)
app.add_typer(user_app, name="user")
app.command("verify")(verify_command)
keys_app.command("rotate-signing")(rotate_signing_command)
cli_agent.register(app)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _settings() -> Settings:
    return load_settings()


def _services() -> Services:
    from multimail.runtime import build_services

    return build_services(_settings())


def _operator(svc: Services) -> Actor:
    """The local CLI acts as the operator of the (first) account on this database."""
    from sqlalchemy import select

    from multimail.store.tables import accounts as accounts_table

    with svc.db.read() as conn:
        row = conn.execute(
            select(accounts_table.c.id)
            .where(accounts_table.c.status == "active")
            .order_by(accounts_table.c.id)
            .limit(1)
        ).first()
    if row is None:
        typer.echo("no account yet: run `multimail init` (or `multimail serve`) first", err=True)
        raise typer.Exit(1)
    return Actor(type="user", id="cli", name="local operator (cli)", account_id=row.id)


def _fail(exc: MultimailError) -> None:
    typer.echo(f"error ({exc.code}): {exc.message}", err=True)
    raise typer.Exit(2)


def _print_bootstrap(result: accounts.Bootstrap, settings: Settings) -> None:
    typer.echo("MultiMail is set up. Keep these; keys are shown only once.")
    typer.echo(f"Dashboard:     {settings.base_url}/dashboard")
    typer.echo(f"Sign in as:    {result.operator_email}  password: {result.operator_password}")
    typer.echo(f"admin key    (scopes: admin, read):     {result.admin_key}")
    typer.echo(f"agent key    (scopes: send, read):      {result.agent_key}")
    typer.echo(f"reviewer key (scopes: oversight, read): {result.reviewer_key}")


@app.command()
def init(
    account_name: Annotated[str, typer.Option(help="Your organisation's name.")] = "MultiMail",
    operator_email: Annotated[str, typer.Option(help="First operator's sign-in.")] = (
        "admin@localhost"
    ),
    oversight_email: Annotated[
        str | None, typer.Option(help="Where approval requests and codes go.")
    ] = None,
) -> None:
    """Create the data directory, the database, the first account and its three keys."""
    svc = _services()
    if accounts.has_accounts(svc.db):
        typer.echo("already initialised: an account exists on this database")
        return
    try:
        result = accounts.bootstrap(
            svc.db,
            account_name=account_name,
            operator_email=operator_email,
            oversight_email=oversight_email,
        )
    except MultimailError as exc:
        _fail(exc)
        return
    _print_bootstrap(result, svc.settings)


@app.command()
def serve(
    role: Annotated[
        str, typer.Option(help="all, api, smtp or worker (several processes can share PostgreSQL).")
    ] = "",
    host: Annotated[str | None, typer.Option(help="HTTP bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port.")] = None,
) -> None:
    """Start MultiMail; on a fresh machine this also sets everything up and prints keys."""
    from multimail.runtime import build_services
    from multimail.runtime import serve as run

    overrides: dict[str, Any] = {}
    if host:
        overrides["http_host"] = host
    if port:
        overrides["http_port"] = port
    if role:
        overrides["role"] = role
    settings = load_settings(**overrides)
    svc = build_services(settings)
    if not accounts.has_accounts(svc.db):
        _print_bootstrap(accounts.bootstrap(svc.db), settings)
    parts = []
    if settings.role in ("all", "api"):
        parts.append(
            f"HTTP on http://{settings.http_host}:{settings.http_port} "
            "(health: /health, API docs: /docs)"
        )
    if settings.role in ("all", "smtp"):
        parts.append(f"SMTP on {settings.smtp_host}:{settings.smtp_port}")
    if settings.role in ("all", "worker"):
        parts.append("workers running")
    typer.echo(f"MultiMail ({settings.role}): " + "; ".join(parts))
    sys.stdout.flush()
    asyncio.run(run(svc, role=settings.role))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration."""
    from multimail.runtime import build_services
    from multimail.store.migrate import current_revision

    svc = build_services(_settings())
    typer.echo(f"database at revision {current_revision(svc.db)}")


@keys_app.command("create")
def keys_create(
    name: str,
    scopes: Annotated[str, typer.Option(help="Comma-separated: read, send, oversight, admin.")],
    test: Annotated[bool, typer.Option("--test", help="A mm_test_ key (captures mail).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key and print it once."""
    svc = _services()
    actor = _operator(svc)
    try:
        with svc.db.write() as conn:
            created = keys.create_key(
                conn,
                actor=actor,
                account_id=actor.account_id or "",
                name=name,
                scopes=[s.strip() for s in scopes.split(",") if s.strip()],
                mode="test" if test else "live",
            )
    except MultimailError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(created.record | {"key": created.raw_key}))
    else:
        typer.echo(f"{created.record['id']}  scopes: {', '.join(created.record['scopes'])}")
        typer.echo(created.raw_key)
        typer.echo("store this key now: it is shown only once", err=True)


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False) -> None:
    """List keys (never the keys themselves)."""
    svc = _services()
    actor = _operator(svc)
    with svc.db.read() as conn:
        rows = keys.list_keys(conn, actor.account_id or "")
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        state = "revoked" if row["revoked"] else "active"
        typer.echo(
            f"{row['id']}  {row['prefix']}…  {row['name']:<16} "
            f"{','.join(row['scopes']):<20} {state}"
        )


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key; it stops working on the next request."""
    svc = _services()
    actor = _operator(svc)
    try:
        with svc.db.write() as conn:
            keys.revoke_key(conn, actor=actor, account_id=actor.account_id or "", key_id=key_id)
    except MultimailError as exc:
        _fail(exc)
    typer.echo(f"revoked {key_id}")


@mailbox_app.command("create")
def mailbox_create(
    address: str,
    display_name: Annotated[str | None, typer.Option()] = None,
    mode: Annotated[str, typer.Option(help="Oversight mode.")] = "gated_send",
    as_json: JsonOpt = False,
) -> None:
    """Create a mailbox (the operator may choose any mode)."""
    svc = _services()
    actor = _operator(svc)
    try:
        with svc.db.write() as conn:
            view = mailboxes.create_mailbox(
                conn,
                actor=actor,
                settings=svc.settings,
                address=address,
                display_name=display_name,
                oversight_mode=mode,
            )
    except MultimailError as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(view) if as_json else f"{view['id']}  {view['address']}  {mode}")


@mailbox_app.command("list")
def mailbox_list(as_json: JsonOpt = False) -> None:
    """List mailboxes."""
    svc = _services()
    actor = _operator(svc)
    with svc.db.read() as conn:
        rows = mailboxes.list_mailboxes(conn, actor)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        typer.echo(f"{row['id']}  {row['address']:<40} {row['oversight_mode']}")


def _copies(field: str, given: list[str] | None, clear: bool) -> list[str] | None:
    """The new ``auto_cc``/``auto_bcc`` list: the addresses given, ``[]`` to clear it, or
    ``None`` to leave it as it is."""
    option = "--" + field.replace("_", "-")
    if given and clear:
        raise typer.BadParameter(f"give {option} or --no-{option[2:]}, not both")
    return [] if clear else given or None


@mailbox_app.command("configure")
def mailbox_configure(
    mailbox: str,
    mode: Annotated[str | None, typer.Option(help="Oversight mode.")] = None,
    display_name: Annotated[str | None, typer.Option()] = None,
    gate_timing: Annotated[str | None, typer.Option()] = None,
    auto_cc: Annotated[
        list[str] | None,
        typer.Option(
            "--auto-cc",
            metavar="ADDRESS",
            help="Copy every message to ADDRESS (repeatable; replaces the current list).",
        ),
    ] = None,
    no_auto_cc: Annotated[
        bool, typer.Option("--no-auto-cc", help="Clear the auto_cc list.")
    ] = False,
    auto_bcc: Annotated[
        list[str] | None,
        typer.Option(
            "--auto-bcc",
            metavar="ADDRESS",
            help="Blind-copy every message to ADDRESS, e.g. an archive (repeatable; replaces "
            "the current list).",
        ),
    ] = None,
    no_auto_bcc: Annotated[
        bool, typer.Option("--no-auto-bcc", help="Clear the auto_bcc list.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Change a mailbox's settings (as the operator: loosening is allowed here).

    The local CLI is the operator, so what an API key needs an approval code for (a looser
    mode, auto_cc/auto_bcc) applies at once, recorded in the audit log as the operator's.
    """
    copies = {
        "auto_cc": _copies("auto_cc", auto_cc, no_auto_cc),
        "auto_bcc": _copies("auto_bcc", auto_bcc, no_auto_bcc),
    }
    svc = _services()
    actor = _operator(svc)
    changes = {
        k: v
        for k, v in {
            "oversight_mode": mode,
            "display_name": display_name,
            "gate_timing": gate_timing,
            **copies,
        }.items()
        if v is not None
    }
    try:
        with svc.db.write() as conn:
            view = mailboxes.update_mailbox(conn, actor=actor, ref=mailbox, changes=changes)
    except MultimailError as exc:
        _fail(exc)
        return
    typer.echo(
        json.dumps(view)
        if as_json
        else f"{view['id']}  {view['address']}  {view['oversight_mode']}"
    )


@app.command()
def mcp() -> None:
    """Run the MCP server on stdio for an agent (Claude Desktop, Claude Code, Cursor, ...).

    It talks to the MultiMail server at MULTIMAIL_API_URL with MULTIMAIL_API_KEY; the default
    mailbox is MULTIMAIL_MAILBOX_ID (or the key's only mailbox).
    """
    from multimail.mcp.server import run_stdio

    run_stdio()


@user_app.command("create")
def user_create(
    email: str,
    name: Annotated[str, typer.Option(help="Shown on decisions.")] = "Operator",
    password: Annotated[
        str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)
    ] = "",
) -> None:
    """Create another dashboard operator for the local account."""
    svc = _services()
    actor = _operator(svc)
    try:
        with svc.db.write() as conn:
            user = accounts.create_operator(
                conn,
                actor=actor,
                account_id=actor.account_id or "",
                email=email,
                name=name,
                password=password,
            )
    except MultimailError as exc:
        _fail(exc)
        return
    typer.echo(f"{user['id']}  {user['email']}")
