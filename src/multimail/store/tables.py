"""Every table of the product, from the start, so later work adds behaviour rather than tables.

SQLAlchemy Core tables. Timestamps are timezone-aware UTC; JSON columns hold lists/objects.
Queues (jobs, webhook deliveries) carry lock columns (``locked_by``, ``locked_until``) and an
attempt log, the way Postal and Stalwart keep theirs.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

ID = String(40)


def _id(prefix_comment: str) -> Column[str]:
    return Column("id", ID, primary_key=True, comment=prefix_comment)


def _ts(name: str, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


def _account_fk() -> Column[str]:
    return Column("account_id", ID, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)


accounts = Table(
    "accounts",
    metadata,
    _id("acct_"),
    Column("name", String(200), nullable=False),
    Column("oversight_email", String(320), nullable=True),
    Column("postal_address", Text, nullable=True),
    Column("plan", String(40), nullable=False, server_default="self_hosted"),
    Column("daily_send_quota", Integer, nullable=True),
    Column("sending_enabled", Boolean, nullable=False, server_default=text("true")),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("status", String(20), nullable=False, server_default="active"),
    _ts("created_at", False),
    _ts("updated_at", False),
    _ts("deleted_at"),
)

operator_users = Table(
    "operator_users",
    metadata,
    _id("usr_"),
    _account_fk(),
    Column("email", String(320), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("password_hash", String(200), nullable=False),
    Column("role", String(20), nullable=False, server_default="owner"),
    Column("disabled", Boolean, nullable=False, server_default=text("false")),
    _ts("created_at", False),
    _ts("last_sign_in_at"),
)

dashboard_sessions = Table(
    "dashboard_sessions",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", ID, ForeignKey("operator_users.id", ondelete="CASCADE"), nullable=False),
    Column("csrf_token", String(64), nullable=False),
    _ts("created_at", False),
    _ts("expires_at", False),
)

api_keys = Table(
    "api_keys",
    metadata,
    _id("key_"),
    _account_fk(),
    Column("name", String(200), nullable=False),
    Column("prefix", String(24), nullable=False, comment="first characters, shown in lists"),
    Column(
        "key_hash", String(64), nullable=False, unique=True, comment="sha256 hex; never the key"
    ),
    Column("scopes", JSON, nullable=False),
    Column("mode", String(8), nullable=False, comment="live | test"),
    Column("mailbox_ids", JSON, nullable=True, comment="restrict to these mailboxes; null = all"),
    Column("send_cap_hour", Integer, nullable=True),
    Column("send_cap_day", Integer, nullable=True),
    Column("created_by", String(200), nullable=True),
    _ts("created_at", False),
    _ts("last_used_at"),
    _ts("revoked_at"),
    Column(
        "operator_credential",
        Boolean,
        nullable=False,
        server_default=text("false"),
        comment="minted by the operator with admin scope: acts as the operator",
    ),
)

domains = Table(
    "domains",
    metadata,
    _id("dom_"),
    _account_fk(),
    Column("name", String(253), nullable=False),
    Column("verification_token", String(80), nullable=False),
    Column("dkim_selector", String(63), nullable=False),
    Column("dkim_private_key", Text, nullable=False, comment="PEM; secret"),
    Column("dkim_public_key", Text, nullable=False, comment="base64 DER for the TXT record"),
    Column("status", String(20), nullable=False, server_default="pending"),
    Column("check_results", JSON, nullable=True),
    _ts("verified_at"),
    _ts("last_checked_at"),
    _ts("created_at", False),
    UniqueConstraint("account_id", "name", name="uq_domains_account_name"),
)

mailboxes = Table(
    "mailboxes",
    metadata,
    _id("mbx_"),
    _account_fk(),
    Column("domain_id", ID, ForeignKey("domains.id", ondelete="RESTRICT"), nullable=True),
    Column("address", String(320), nullable=False),
    Column("display_name", String(200), nullable=True),
    Column("oversight_mode", String(20), nullable=False, server_default="gated_send"),
    Column("gate_timing", String(20), nullable=False, server_default="gate_first"),
    Column("signature", Text, nullable=True),
    Column("auto_cc", JSON, nullable=False, server_default="[]"),
    Column("auto_bcc", JSON, nullable=False, server_default="[]"),
    Column("webhook_url", String(2048), nullable=True),
    Column("ai_disclosure", Boolean, nullable=False, server_default=text("true")),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("approval_timeout_seconds", Integer, nullable=False, server_default="86400"),
    Column("approval_expiry_seconds", Integer, nullable=False, server_default="259200"),
    Column("send_cap_hour", Integer, nullable=True),
    Column("send_cap_day", Integer, nullable=True),
    Column("metadata", JSON, nullable=True),
    _ts("created_at", False),
    _ts("updated_at", False),
    _ts("deleted_at"),
    Index(
        "uq_mailboxes_live_address",
        "address",
        unique=True,
        sqlite_where=text("deleted_at IS NULL"),
        postgresql_where=text("deleted_at IS NULL"),
    ),
    Index("ix_mailboxes_account", "account_id"),
)

mailbox_allowlist = Table(
    "mailbox_allowlist",
    metadata,
    _id("alw_"),
    Column("mailbox_id", ID, ForeignKey("mailboxes.id", ondelete="CASCADE"), nullable=False),
    Column("pattern", String(320), nullable=False, comment="exact address or *@domain"),
    Column("added_by", String(200), nullable=False),
    _ts("created_at", False),
    UniqueConstraint("mailbox_id", "pattern", name="uq_allowlist_mailbox_pattern"),
)

threads = Table(
    "threads",
    metadata,
    _id("thr_"),
    _account_fk(),
    Column("mailbox_id", ID, ForeignKey("mailboxes.id", ondelete="CASCADE"), nullable=False),
    Column("external_id", String(200), nullable=True, comment="caller-chosen thread_id"),
    Column("subject", Text, nullable=True),
    Column("normalized_subject", String(300), nullable=True),
    Column("message_count", Integer, nullable=False, server_default="0"),
    _ts("created_at", False),
    _ts("last_activity_at", False),
    UniqueConstraint("mailbox_id", "external_id", name="uq_threads_mailbox_external"),
    Index("ix_threads_mailbox_subject", "mailbox_id", "normalized_subject"),
)

messages = Table(
    "messages",
    metadata,
    _id("msg_"),
    _account_fk(),
    Column("mailbox_id", ID, ForeignKey("mailboxes.id", ondelete="CASCADE"), nullable=False),
    Column("thread_id", ID, ForeignKey("threads.id", ondelete="SET NULL"), nullable=True),
    Column("direction", String(8), nullable=False, comment="inbound | outbound"),
    Column("status", String(30), nullable=False),
    Column("test", Boolean, nullable=False, server_default=text("false")),
    Column("message_id_header", String(998), nullable=True, comment="RFC 5322 Message-ID"),
    Column("in_reply_to", String(998), nullable=True),
    Column("references", JSON, nullable=False, server_default="[]"),
    Column("reply_to_email_id", ID, nullable=True, comment="our message this one answers"),
    Column("from_address", String(320), nullable=True),
    Column("from_name", String(200), nullable=True),
    Column("to", JSON, nullable=False, server_default="[]"),
    Column("cc", JSON, nullable=False, server_default="[]"),
    Column("bcc", JSON, nullable=False, server_default="[]"),
    Column("reply_to", JSON, nullable=False, server_default="[]"),
    Column("subject", Text, nullable=False, server_default=""),
    Column("markdown", Text, nullable=False, server_default=""),
    Column("html", Text, nullable=True),
    Column("text", Text, nullable=True),
    Column("quoted_text", Text, nullable=True),
    Column("original_subject", Text, nullable=True, comment="the agent's draft when edited"),
    Column("original_markdown", Text, nullable=True),
    Column("metadata", JSON, nullable=True),
    Column("headers", JSON, nullable=True),
    Column("auth_results", JSON, nullable=True),
    Column("spam_score", Float, nullable=True),
    Column("spam_reasons", JSON, nullable=True),
    Column("scan_findings", JSON, nullable=True),
    Column("oversight_mode", String(20), nullable=True, comment="effective mode"),
    Column("gate_timing", String(20), nullable=True),
    _ts("send_at"),
    Column("idempotency_key", String(255), nullable=True),
    Column("created_by_key_id", ID, nullable=True),
    Column("created_by_key_name", String(200), nullable=True),
    Column("decision", String(10), nullable=True, comment="approve | reject"),
    Column("reviewer", String(200), nullable=True),
    Column("decision_note", Text, nullable=True),
    _ts("decided_at"),
    Column("raw", LargeBinary, nullable=True, comment="the bytes received or handed to SMTP"),
    Column("size_bytes", Integer, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    _ts("next_attempt_at"),
    Column("last_error", Text, nullable=True),
    Column("bounce_type", String(10), nullable=True),
    _ts("delivered_at"),
    _ts("read_at"),
    _ts("reminded_at"),
    # When it last went back to the approval queue (an edit voided its approval); NULL: the
    # wait counts from created_at, or send_at for schedule_first.
    _ts("pending_since"),
    _ts("created_at", False),
    _ts("updated_at", False),
    Column(
        "surfaced_id",
        ID,
        nullable=True,
        comment="msg_ id minted when held or spam mail became visible; NULL: on arrival",
    ),
    Index("ix_messages_mailbox_created", "mailbox_id", "id"),
    Index("ix_messages_mailbox_surfaced", "mailbox_id", "surfaced_id"),
    Index("ix_messages_account_status", "account_id", "status"),
    Index("ix_messages_thread", "thread_id"),
    Index("ix_messages_message_id_header", "message_id_header"),
    Index("ix_messages_status_next_attempt", "status", "next_attempt_at"),
)

attachments = Table(
    "attachments",
    metadata,
    _id("att_"),
    Column("message_id", ID, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("filename", String(255), nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("inline", Boolean, nullable=False, server_default=text("false")),
    Column("content_id", String(255), nullable=True),
    Column("data", LargeBinary, nullable=False),
    Index("ix_attachments_message", "message_id"),
)

message_tags = Table(
    "message_tags",
    metadata,
    Column("message_id", ID, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("value", Text, nullable=False, server_default=""),
)

delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", ID, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    _ts("started_at", False),
    _ts("finished_at", False),
    Column("host", String(255), nullable=True),
    Column("port", Integer, nullable=True),
    Column("smtp_code", Integer, nullable=True),
    Column("reply", Text, nullable=True),
    Column(
        "outcome", String(20), nullable=False, comment="delivered | deferred | bounced | failed"
    ),
    Column("recipients", JSON, nullable=True),
    Column("worker", String(100), nullable=True),
    Index("ix_delivery_attempts_message", "message_id"),
)

inbound_raw = Table(
    "inbound_raw",
    metadata,
    _id("inb_"),
    Column("mail_from", String(320), nullable=False),
    Column("rcpt_tos", JSON, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("peer", String(100), nullable=True),
    Column("helo", String(255), nullable=True),
    Column("tls", Boolean, nullable=False, server_default=text("false")),
    Column("status", String(20), nullable=False, server_default="stored"),
    Column("error", Text, nullable=True),
    _ts("received_at", False),
    _ts("processed_at"),
)

contacts = Table(
    "contacts",
    metadata,
    _id("con_"),
    _account_fk(),
    Column("name", String(200), nullable=True),
    Column("email", String(320), nullable=False),
    Column("tags", JSON, nullable=False, server_default="[]"),
    Column("notes", Text, nullable=True),
    _ts("created_at", False),
    _ts("updated_at", False),
    UniqueConstraint("account_id", "email", name="uq_contacts_account_email"),
)

suppressions = Table(
    "suppressions",
    metadata,
    _id("sup_"),
    _account_fk(),
    Column("address", String(320), nullable=False),
    Column(
        "reason", String(20), nullable=False, comment="hard_bounce|complaint|unsubscribe|manual"
    ),
    Column("source_message_id", ID, nullable=True),
    Column("details", Text, nullable=True),
    _ts("created_at", False),
    UniqueConstraint("account_id", "address", name="uq_suppressions_account_address"),
)

webhooks = Table(
    "webhooks",
    metadata,
    _id("whk_"),
    _account_fk(),
    Column("mailbox_id", ID, ForeignKey("mailboxes.id", ondelete="CASCADE"), nullable=True),
    Column("url", String(2048), nullable=False),
    Column("events", JSON, nullable=False, comment="names as subscribed (aliases kept)"),
    Column("secret", String(200), nullable=False),
    Column("previous_secret", String(200), nullable=True),
    _ts("previous_secret_expires_at"),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    Column("disabled_reason", Text, nullable=True),
    Column("description", String(500), nullable=True),
    Column("source", String(20), nullable=False, server_default="api", comment="api | mailbox"),
    _ts("failing_since"),
    _ts("created_at", False),
    _ts("updated_at", False),
)

events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", ID, nullable=False, unique=True, comment="evt_"),
    _account_fk(),
    Column("mailbox_id", ID, nullable=True),
    Column("message_id", ID, nullable=True),
    Column("type", String(60), nullable=False),
    Column("payload", JSON, nullable=False),
    _ts("created_at", False),
    Index("ix_events_account_seq", "account_id", "seq"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", ID, primary_key=True, comment="dlv_"),
    Column("webhook_id", ID, ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
    Column("event_id", ID, nullable=False),
    Column("event_name", String(60), nullable=False, comment="the name the subscriber asked for"),
    Column("status", String(20), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    _ts("next_attempt_at", False),
    Column("locked_by", String(100), nullable=True),
    _ts("locked_until"),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    _ts("created_at", False),
    _ts("delivered_at"),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_webhook", "webhook_id"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "delivery_id", ID, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), nullable=False
    ),
    _ts("at", False),
    Column("status_code", Integer, nullable=True),
    Column("latency_ms", Integer, nullable=True),
    Column("response_excerpt", Text, nullable=True),
    Column("error", Text, nullable=True),
    Index("ix_webhook_attempts_delivery", "delivery_id"),
)

jobs = Table(
    "jobs",
    metadata,
    _id("job_"),
    Column("kind", String(40), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("status", String(20), nullable=False, server_default="pending"),
    _ts("run_at", False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False, server_default="50"),
    Column("locked_by", String(100), nullable=True),
    _ts("locked_until"),
    Column("last_error", Text, nullable=True),
    Column("dedupe_key", String(200), nullable=True, unique=True),
    _ts("created_at", False),
    _ts("updated_at", False),
    Index("ix_jobs_due", "status", "run_at"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    _account_fk(),
    Column("key", String(255), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("message_id", ID, nullable=True),
    Column("response", JSON, nullable=True),
    _ts("created_at", False),
    _ts("expires_at", False),
    UniqueConstraint("account_id", "key", name="uq_idempotency_account_key"),
)

approval_codes = Table(
    "approval_codes",
    metadata,
    _id("apc_"),
    _account_fk(),
    Column("purpose", String(40), nullable=False),
    Column("subject_id", String(200), nullable=True),
    Column("code_hash", String(64), nullable=False),
    Column("params", JSON, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    _ts("expires_at", False),
    _ts("used_at"),
    _ts("created_at", False),
)

used_link_tokens = Table(
    "used_link_tokens",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("purpose", String(40), nullable=False),
    _ts("used_at", False),
)

audit_entries = Table(
    "audit_entries",
    metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    ),
    Column("at", String(32), nullable=False, comment="ISO 8601 UTC, exactly as hashed"),
    Column("account_id", ID, nullable=True),
    Column("actor_type", String(20), nullable=False, comment="key | user | system"),
    Column("actor_id", String(200), nullable=True),
    Column("actor_name", String(200), nullable=True),
    Column("action", String(80), nullable=False),
    Column("subject_type", String(40), nullable=True),
    Column("subject_id", String(200), nullable=True),
    Column("mailbox_id", ID, nullable=True),
    Column("oversight_mode", String(20), nullable=True),
    Column("details", Text, nullable=False, server_default="{}", comment="canonical JSON"),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_account_seq", "account_id", "seq"),
    Index("ix_audit_subject", "subject_id"),
    Index("ix_audit_action", "action"),
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    _id("ckp_"),
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("key_id", String(80), nullable=False),
    Column("signature", String(200), nullable=False),
    _ts("signed_at", False),
)

rate_limit_buckets = Table(
    "rate_limit_buckets",
    metadata,
    Column("bucket", String(200), primary_key=True),
    Column("tokens", Float, nullable=False),
    Column("updated_at", Float, nullable=False, comment="epoch seconds"),
)

server_settings = Table(
    "server_settings",
    metadata,
    Column("key", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)
