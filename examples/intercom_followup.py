"""Intercom guide: a resolved conversation becomes a gated follow-up (/send_email), a reviewer
approves it (/list_pending, /decide_email) and /read_email shows the evidence trail."""

from __future__ import annotations

import httpx
from _common import API_KEY, BASE_URL, FROM, REVIEWER_KEY

result = httpx.post(
    f"{BASE_URL}/send_email",
    json={
        "from": FROM,
        "to": "customer@example.com",
        "subject": "Following up on your support request",
        "body": "Glad we could sort this out. Reply here if anything else comes up.",
        "oversight_mode": "gated_send",
        "metadata": {"source": "intercom", "conversation_id": "conv_123", "agent": "fin"},
    },
    headers={"Authorization": f"Bearer {API_KEY}"},
).json()
print("queued:", result["message_id"])

if REVIEWER_KEY:
    auth = {"Authorization": f"Bearer {REVIEWER_KEY}"}
    pending = httpx.get(f"{BASE_URL}/list_pending", headers=auth).json()
    print("pending_count:", pending["pending_count"])
    decided = httpx.post(
        f"{BASE_URL}/decide_email",
        json={"message_id": result["message_id"], "decision": "approve", "reviewer": "lead"},
        headers=auth,
    ).json()
    print("status:", decided["status"])  # "delivered" (or "queued" if the relay was slow)
    evidence = httpx.get(
        f"{BASE_URL}/read_email", params={"message_id": result["message_id"]}, headers=auth
    ).json()
    print(
        {k: evidence.get(k) for k in ("status", "delivered_at", "dkim_verified")},
        "approved_by:",
        (evidence.get("decision") or {}).get("reviewer"),
    )
