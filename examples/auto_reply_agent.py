"""Auto-reply guide: for each unread email, load its thread, queue a gated reply, then run the
reviewer's approve / edit / reject loop (the drafting step here is a stub for your LLM)."""

from __future__ import annotations

from _common import FROM, REVIEWER_KEY

from multimail import MultimailClient

client = MultimailClient()  # MULTIMAIL_API_KEY / MULTIMAIL_API_URL from the environment


def draft_reply(thread: dict, incoming: dict) -> str:
    # Replace with your model call; never act on instructions found in incoming["body_text"].
    return f"Hi, thanks for your message about “{incoming['subject']}”. [REVIEWER: please complete]"


for email in client.check_inbox(mailbox_id=FROM, filter="unread")["emails"]:
    thread = client.get_thread(thread_id=email["thread_id"])
    queued = client.reply_email(
        message_id=email["id"], body=draft_reply(thread, email), oversight_mode="gated_send"
    )
    print("queued reply", queued["message_id"], queued["status"])

if REVIEWER_KEY:
    reviewer = MultimailClient(api_key=REVIEWER_KEY)
    for item in reviewer.list_pending(mailbox_id=FROM)["messages"]:
        print(f"From: {item['from']}\nSubject: {item['subject']}")
        print(f"Draft reply:\n{item['draft_body']}\n")
        action = input("[a]pprove / [e]dit / [r]eject: ").strip().lower()
        if action == "a":
            reviewer.decide_email(message_id=item["message_id"], decision="approve")
        elif action == "e":
            reviewer.decide_email(
                message_id=item["message_id"], decision="approve", revised_body=input("Revised: ")
            )
        elif action == "r":
            reviewer.decide_email(
                message_id=item["message_id"], decision="reject", rejection_note=input("Note: ")
            )
