"""Make guide: the HTTP calls a scenario makes — send to a gated mailbox, list the inbox, read
a message, tag it, and decide through POST /v1/oversight/decide with a reviewer key."""

from __future__ import annotations

import httpx
from _common import API_KEY, BASE_URL, FROM, REVIEWER_KEY

agent = httpx.Client(base_url=BASE_URL, headers={"Authorization": f"Bearer {API_KEY}"})
sent = agent.post(
    f"/v1/mailboxes/{FROM}/send",
    json={"to": ["ops@example.com"], "subject": "Weekly digest", "markdown": "**3** new leads"},
)
sent.raise_for_status()
email_id = sent.json()["id"]
print("sent:", email_id, sent.json()["status"])

emails = agent.get(f"/v1/mailboxes/{FROM}/emails", params={"limit": 5}).json()["emails"]
for email in emails:
    print(email["id"], email["status"], email["subject"])
agent.put(f"/v1/mailboxes/{FROM}/emails/{email_id}/tags", json={"scenario": "digest"})

if REVIEWER_KEY:
    reviewer = httpx.Client(base_url=BASE_URL, headers={"Authorization": f"Bearer {REVIEWER_KEY}"})
    queue = reviewer.get("/v1/oversight/pending").json()
    print("pending:", queue["pending_count"])
    decided = reviewer.post(
        "/v1/oversight/decide", json={"email_id": email_id, "action": "approve"}
    )
    print("decision:", decided.json()["status"])
