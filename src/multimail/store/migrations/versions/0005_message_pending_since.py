"""Messages record when they last entered the approval queue.

A scheduled message whose approval an edit voided goes back to the reviewer days after it was
written; its reminder and expiry must count from then, not from ``created_at``.
``pending_since`` is set on such a return; NULL (every existing row, and every first wait)
keeps the earlier rule: ``created_at``, or the send time for ``schedule_first``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # In place (ALTER TABLE ADD COLUMN): a batch copy would rewrite every stored message.
    op.add_column(
        "messages",
        sa.Column(
            "pending_since",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="when it went back to the approval queue; NULL: created_at / send_at",
        ),
    )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("pending_since")
