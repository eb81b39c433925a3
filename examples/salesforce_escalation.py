"""Salesforce guide: a CRM event queues a gated email, it shows in the pending list, and a
record change cancels it (409 once it was delivered)."""

from __future__ import annotations

import requests
from _common import API_KEY, BASE_URL, FROM

HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

response = requests.post(
    f"{BASE_URL}/v1/send",
    headers=HEADERS,
    json={
        "from": FROM,
        "to": "cfo@example.com",
        "subject": "Welcome aboard, Globex",
        "text": "Your contract has been processed. Rita will follow up with onboarding details.",
        "oversight_mode": "gated_send",
        "metadata": {"opportunity_id": "006xx1", "source": "crm_closed_won_agent"},
    },
    timeout=30,
)
response.raise_for_status()
message_id = response.json()["id"]
print(f"Queued for approval: {message_id}")

pending = requests.get(f"{BASE_URL}/v1/pending", headers=HEADERS, timeout=30).json()["messages"]
print(
    f"{len(pending)} message(s) pending; ours is there: {message_id in [m['id'] for m in pending]}"
)

cancel = requests.post(
    f"{BASE_URL}/v1/cancel/{message_id}",
    headers=HEADERS,
    json={"reason": "account on hold"},
    timeout=30,
)
print("cancelled" if cancel.status_code == 200 else f"not cancelled: {cancel.json()['error']}")
