"""PostgreSQL refuses TRUNCATE of the audit log too.

Row-level triggers (0001) never fire for TRUNCATE, which would empty the append-only log in
one statement. SQLite has no TRUNCATE (its ``DELETE`` without ``WHERE`` is refused by 0001).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE TRIGGER audit_entries_no_truncate BEFORE TRUNCATE ON audit_entries "
            "FOR EACH STATEMENT EXECUTE FUNCTION multimail_audit_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_entries_no_truncate ON audit_entries")
