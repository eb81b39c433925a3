"""CLI commands over the Python client (a server at MULTIMAIL_API_URL, key MULTIMAIL_API_KEY).

``review`` is the interactive approve / edit / reject loop over the pending queue; ``send``,
``inbox``, ``thread`` and ``webhooks`` cover the agent's day. Tables for people, ``--json``
for scripts. The ``multimail`` command mounts these (see ``cli.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from multimail.client import MultimailAPIError, MultimailClient

console = Console()
webhooks_app = typer.Typer(help="Webhook subscriptions.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
MailboxOpt = Annotated[str | None, typer.Option("--mailbox", "-m", help="Mailbox id or address.")]


def _client() -> MultimailClient:
    return MultimailClient()


def _emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json or table is None:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        console.print(table)


def _fail(exc: MultimailAPIError) -> None:
    typer.echo(f"error ({exc.code}): {exc.message}", err=True)
    raise typer.Exit(2)


def _plain(value: object) -> Text:
    """``value`` as literal text: Rich would read a ``str`` as markup, and subjects, senders,
    bodies and URLs come from outside (``[/]`` crashes it, ``[link=…]`` would be obeyed)."""
    return Text("" if value is None else str(value))


def _messages_table(title: str, items: list[dict[str, Any]]) -> Table:
    table = Table(title=_plain(title))
    for column in ("id", "status", "from", "to", "subject", "created_at"):
        table.add_column(column)
    for m in items:
        table.add_row(
            _plain(m.get("id")),
            _plain(m.get("status")),
            _plain(m.get("from")),
            _plain(", ".join(m.get("to") or [])),
            _plain(m.get("subject")),
            _plain(m.get("created_at")),
        )
    return table


def send(
    to: Annotated[list[str], typer.Option("--to", help="Recipient (repeatable).")],
    subject: Annotated[str, typer.Option(help="Subject line.")],
    body: Annotated[str, typer.Option(help="Markdown body.")],
    mailbox: MailboxOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Send an email (it may wait for a reviewer's approval)."""
    try:
        sent = _client().send_email(to=to, subject=subject, body=body, mailbox_id=mailbox)
    except MultimailAPIError as exc:
        _fail(exc)
    if as_json:
        _emit(sent, True)
    else:
        typer.echo(f"{sent['message_id']}  {sent['status']}")


def inbox(
    mailbox: MailboxOpt = None,
    status: Annotated[str | None, typer.Option(help="e.g. unread")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List a mailbox's messages, newest first."""
    try:
        found = _client().check_inbox(mailbox_id=mailbox, status=status, limit=limit)
    except MultimailAPIError as exc:
        _fail(exc)
    _emit(found, as_json, _messages_table("inbox", found.get("emails", [])))


def thread(thread_id: str, mailbox: MailboxOpt = None, as_json: JsonOpt = False) -> None:
    """Show a conversation in order."""
    try:
        found = _client().get_thread(thread_id=thread_id, mailbox_id=mailbox)
    except MultimailAPIError as exc:
        _fail(exc)
    _emit(found, as_json, _messages_table(f"thread {thread_id}", found.get("messages", [])))


def _edit(text: str) -> str:
    """Open $EDITOR on ``text`` and return what was saved.

    Raises ``CalledProcessError`` when the editor exits non-zero (vim's ``:cq``, the usual way
    to abandon an edit) and ``OSError`` when it cannot be run.
    """
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.NamedTemporaryFile("w+", suffix=".md", delete=False) as handle:
        handle.write(text)
        path = handle.name
    try:
        subprocess.run([*editor.split(), path], check=True)
        with open(path, encoding="utf-8") as saved:
            return saved.read()
    finally:
        os.unlink(path)


def _show_draft(client: MultimailClient, item: dict[str, Any]) -> None:
    context: list[str] = []
    if item.get("thread_id"):
        try:
            earlier = client.get_thread(thread_id=item["thread_id"], mailbox_id=item["mailbox_id"])
            for m in earlier.get("messages", []):
                if m.get("id") != item["id"]:
                    excerpt = (m.get("body_text") or "")[:400]
                    context.append(f"[{m.get('direction')}] {m.get('from')}: {excerpt}")
        except MultimailAPIError:
            context.append("(thread unavailable)")
    findings = "; ".join(f.get("message", str(f)) for f in item.get("scan_findings") or [])
    header = (
        f"From: {item.get('from')}  To: {', '.join(item.get('to') or [])}\n"
        f"Subject: {item.get('subject')}" + (f"\nScan: {findings}" if findings else "")
    )
    console.print(Panel(_plain(header + "\n\n" + (item.get("draft_body") or "")), title="draft"))
    console.print(
        Panel(_plain("\n\n".join(context) or "(no earlier messages)"), title="thread (untrusted)")
    )


def _pending_drafts(client: MultimailClient, mailbox: str | None) -> Iterator[dict[str, Any]]:
    """Every draft of the pending queue, each once, a page at a time.

    The queue is walked page by page through ``next_cursor`` (a position, so deciding drafts
    meanwhile moves nothing); then it is walked again from the top for drafts that arrived
    during the review, until a walk finds nothing not shown yet. Skipped drafts are not shown
    again: they are the next ``review``'s.
    """
    seen: set[str] = set()
    while True:
        fresh = 0
        cursor: str | None = None
        while True:
            page = client.list_pending(mailbox_id=mailbox, cursor=cursor)
            for item in page.get("messages") or []:
                if item["id"] not in seen:
                    seen.add(item["id"])
                    fresh += 1
                    yield item
            cursor = page.get("next_cursor")
            if not cursor:
                break
        if not fresh:
            return


def _decide(client: MultimailClient, item: dict[str, Any], reviewer: str | None) -> None:
    """Show one draft and carry out what the reviewer chooses for it."""
    _show_draft(client, item)
    action = typer.prompt("[a]pprove / [e]dit / [r]eject / [s]kip", default="s")
    try:
        if action.startswith("a"):
            done = client.decide_email(message_id=item["id"], decision="approve", reviewer=reviewer)
        elif action.startswith("e"):
            try:
                revised = _edit(item.get("draft_body") or "")
            except (subprocess.CalledProcessError, OSError) as exc:
                typer.echo(f"{item['id']}: edit abandoned, nothing decided ({exc})", err=True)
                return
            done = client.decide_email(
                message_id=item["id"],
                decision="approve",
                revised_body=revised,
                reviewer=reviewer,
            )
        elif action.startswith("r"):
            note = typer.prompt("note for the agent")
            done = client.decide_email(
                message_id=item["id"], decision="reject", note=note, reviewer=reviewer
            )
        else:
            return
    except MultimailAPIError as exc:
        typer.echo(f"error ({exc.code}): {exc.message}", err=True)
        return
    typer.echo(f"{item['id']}: {done.get('status')}")


def review(
    mailbox: MailboxOpt = None,
    reviewer: Annotated[str | None, typer.Option(help="Your name, recorded.")] = None,
) -> None:
    """Approve, edit or reject each pending message, seeing it beside its thread.

    Goes over the whole queue, each draft once. An edit abandoned in the editor (it exits
    with an error, e.g. vim's :cq) decides nothing for that draft.
    """
    client = _client()
    shown = 0
    try:
        for item in _pending_drafts(client, mailbox):
            shown += 1
            _decide(client, item, reviewer)
    except MultimailAPIError as exc:
        _fail(exc)
    finally:
        client.close()
    if not shown:
        typer.echo("nothing is waiting for approval")


@webhooks_app.command("list")
def webhooks_list(as_json: JsonOpt = False) -> None:
    """List webhook subscriptions."""
    try:
        found = _client().list_webhooks()
    except MultimailAPIError as exc:
        _fail(exc)
    table = Table(title="webhooks")
    for column in ("id", "url", "events", "enabled"):
        table.add_column(column)
    for hook in found.get("webhooks", []):
        table.add_row(
            _plain(hook.get("id")),
            _plain(hook.get("url")),
            _plain(", ".join(hook.get("events") or [])),
            _plain(hook.get("enabled", "")),
        )
    _emit(found, as_json, table)


@webhooks_app.command("create")
def webhooks_create(
    url: str,
    event: Annotated[list[str], typer.Option("--event", help="Event name (repeatable).")],
    mailbox: MailboxOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Subscribe an endpoint; prints the signing secret once."""
    try:
        hook = _client().create_webhook(url=url, events=event, mailbox_id=mailbox)
    except MultimailAPIError as exc:
        _fail(exc)
    if as_json:
        _emit(hook, True)
    else:
        typer.echo(f"{hook.get('id')}  secret: {hook.get('secret')}  (shown once)")


@webhooks_app.command("delete")
def webhooks_delete(webhook_id: str) -> None:
    """Remove a subscription."""
    try:
        _client().delete_webhook(webhook_id=webhook_id)
    except MultimailAPIError as exc:
        _fail(exc)
    typer.echo(f"deleted {webhook_id}")


def register(app: typer.Typer) -> None:
    """Add these commands to the ``multimail`` app."""
    app.command("send")(send)
    app.command("inbox")(inbox)
    app.command("thread")(thread)
    app.command("review")(review)
    app.add_typer(webhooks_app, name="webhooks")
