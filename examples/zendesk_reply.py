"""Zendesk guide: reply to a ticket with thread_id zd-{ticket}, so later replies and inbound
answers group under the ticket, then check the queue and approve."""

from __future__ import annotations

from _common import FROM, REVIEWER_KEY

from multimail import MultimailClient

TICKET_ID = 4711
client = MultimailClient()
sent = client.send_email(
    from_=FROM,
    to="customer@example.com",
    subject=f"Re: your ticket #{TICKET_ID}",
    body="We refunded the duplicate charge; it shows within 5 business days.",
    thread_id=f"zd-{TICKET_ID}",
    oversight_mode="gated_send",
    metadata={"zendesk_ticket_id": TICKET_ID},
)
print("queued", sent["message_id"], "in thread", sent["thread_id"])
thread = client.get_thread(thread_id=f"zd-{TICKET_ID}")
print("thread has", thread["message_count"], "message(s)")
if REVIEWER_KEY:
    reviewer = MultimailClient(api_key=REVIEWER_KEY)
    print("pending:", reviewer.list_pending()["pending_count"])
    print(
        "decision:",
        reviewer.decide_email(message_id=sent["message_id"], decision="approve")["status"],
    )
