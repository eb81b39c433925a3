"""CLI commands for proof: ``audit verify|export|checkpoint``, ``verify FILE.eml``, key rotation.

``cli.py`` mounts them: ``app.add_typer(audit_app, name="audit")``,
``app.command("verify")(verify_command)`` and
``keys_app.command("rotate-signing")(rotate_signing_command)``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TextIO

import typer

from multimail.config import load_settings
from multimail.errors import MultimailError
from multimail.services import audit, checkpoints, identity
from multimail.services.context import Actor, Services

__all__ = ["audit_app", "rotate_signing_command", "verify_command"]

audit_app = typer.Typer(help="The tamper-evident audit log.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
_OPERATOR = Actor(type="system", id="cli", name="local operator (cli)", account_id=None)


def _services() -> Services:
    from multimail.runtime import build_services

    return build_services(load_settings())


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _read_checkpoints(path: Path) -> list[dict[str, Any]]:
    """One checkpoint (JSON object), a list of them, or JSON lines."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            _fail(f"{path} is not a checkpoint exported by `multimail audit checkpoint`")
    found = data if isinstance(data, list) else [data]
    if not all(isinstance(item, dict) for item in found):
        _fail(f"{path} does not hold checkpoint objects")
    return found


@audit_app.command("verify")
def audit_verify(
    checkpoint: Annotated[
        list[Path] | None,
        typer.Option(
            "--checkpoint",
            help="A checkpoint exported earlier (repeatable): catches truncation and rollback.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the hash chain and every signed checkpoint; name the first broken entry."""
    svc = _services()
    external = [doc for path in checkpoint or [] for doc in _read_checkpoints(path)]
    result = checkpoints.verify_log(svc, external=external)
    svc.db.dispose()
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        for problem in result.checkpoint_problems:
            where = f"{problem['source']}, seq {problem['seq']}"
            typer.echo(f"checkpoint ({where}): {problem['problem']}")
        if result.first_break is not None:
            brk = result.first_break
            typer.echo(f"AUDIT LOG BROKEN at entry {brk.seq} ({brk.kind}): {brk.explanation}")
        elif result.ok:
            typer.echo(
                f"audit log intact: {result.checked} entries, head seq {result.last_seq}, "
                f"{result.checkpoints_checked} signed checkpoints hold"
            )
    if not result.ok:
        raise typer.Exit(1)


@audit_app.command("checkpoint")
def audit_checkpoint(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the checkpoint here.")
    ] = None,
) -> None:
    """Sign the current head now and print it (keep a copy off this machine)."""
    svc = _services()
    made = checkpoints.make_checkpoint(svc, force=True)
    svc.db.dispose()
    if made is None:
        _fail("the audit log is empty: nothing to checkpoint", 1)
    text = json.dumps(made, indent=2)
    if output is not None:
        output.write_text(text + "\n", "utf-8")
    typer.echo(text)


def _write_export(
    svc: Services, where: audit.EntryFilter, fmt: Literal["jsonl", "csv"], out: TextIO
) -> int:
    total = audit.count_entries(svc.db, where)
    written = 0
    with typer.progressbar(
        length=total, label="exporting", file=sys.stderr, show_pos=True
    ) as progress:
        for line in audit.export_lines(_counted(audit.iter_entries(svc.db, where), progress), fmt):
            out.write(line)
            written += 1
    return written


class _Progress(Protocol):
    def update(self, n_steps: int) -> None: ...


def _counted(entries: Iterator[dict[str, Any]], progress: _Progress) -> Iterator[dict[str, Any]]:
    for entry in entries:
        yield entry
        progress.update(1)


@audit_app.command("export")
def audit_export(
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    since: Annotated[str | None, typer.Option(help="ISO 8601 date/time, inclusive.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO 8601 date/time, exclusive.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File; - = stdout.")] = None,
) -> None:
    """Write the whole log (every account) as JSONL or CSV for a date range, streaming."""
    if fmt not in ("jsonl", "csv"):
        _fail("--format must be jsonl or csv")
    chosen: Literal["jsonl", "csv"] = "csv" if fmt == "csv" else "jsonl"
    svc = _services()
    try:
        where = audit.export_filter(account_id=None, date_after=since, date_before=until)
    except MultimailError as exc:
        _fail(exc.message)
        return
    if output is None or str(output) == "-":
        _write_export(svc, where, chosen, sys.stdout)
    else:
        with output.open("w", encoding="utf-8", newline="") as handle:
            count = _write_export(svc, where, chosen, handle)
        typer.echo(f"wrote {count} entries to {output}", err=True)
    svc.db.dispose()


def verify_command(
    file: Annotated[Path, typer.Argument(help="The message (.eml) to check.", exists=True)],
    as_json: JsonOpt = False,
) -> None:
    """Check a message's DKIM signature (by its From domain), identity token, body hashes
    (text, HTML and attachments), Message-ID and From."""
    svc = _services()
    try:
        report = identity.verify_raw_message(svc, file.read_bytes())
    except MultimailError as exc:
        _fail(exc.message)
        return
    finally:
        svc.db.dispose()
    if as_json:
        typer.echo(json.dumps(report))
    else:
        for check in report["checks"]:
            mark = "PASS" if check["passed"] else "FAIL"
            typer.echo(f"{mark}  {check['name']:<20} {check['reason']}")
        claims = report.get("claims")
        if claims:
            approval = claims.get("approval")
            agent = claims.get("agent_name") or claims.get("agent_key")
            typer.echo(
                f"      mailbox {claims['mailbox']} · operator {claims['operator']} · "
                f"mode {claims['mode']} · agent {agent}"
                + (f" · approved by {approval['reviewer']}" if approval else "")
            )
        typer.echo(f"verdict: {report['verdict'].upper()}")
    if report["verdict"] != "verified":
        raise typer.Exit(1)


def rotate_signing_command(as_json: JsonOpt = False) -> None:
    """Make a new identity signing key; old public keys stay published for old mail."""
    svc = _services()
    try:
        rotated = identity.rotate_signing_key(svc, actor=_OPERATOR)
    finally:
        svc.db.dispose()
    if as_json:
        typer.echo(json.dumps(rotated))
    else:
        typer.echo(f"new signing key {rotated['key_id']} (was {rotated['previous_key_id']})")
