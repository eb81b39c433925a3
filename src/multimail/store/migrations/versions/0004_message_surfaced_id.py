"""Messages record when held or quarantined mail became visible to the agent.

``surfaced_id`` is a ``msg_`` id minted when a reviewer releases held inbound mail or it is
marked not spam; ``since_id`` pollers compare ``coalesce(surfaced_id, id)``, so mail released
out of order is still new to them. NULL (every existing row) means visible since arrival.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Not batch: ALTER TABLE ADD COLUMN works in place on SQLite too, where a batch copy
    # would rewrite every stored message.
    op.add_column(
        "messages",
        sa.Column(
            "surfaced_id",
            sa.String(length=40),
            nullable=True,
            comment="msg_ id minted when held or spam mail became visible; NULL: on arrival",
        ),
    )
    op.create_index(
        "ix_messages_mailbox_surfaced", "messages", ["mailbox_id", "surfaced_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_messages_mailbox_surfaced", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("surfaced_id")
