"""The first command of the README on a fresh data directory, and the local CLI commands."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from multimail.testing.processes import free_port

MULTIMAIL = [sys.executable, "-m", "multimail"]


def env_for(tmp_path: Path, db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIMAIL_")}
    env["MULTIMAIL_DATA_DIR"] = str(tmp_path / "fresh")
    if not db_url.startswith("sqlite"):
        env["MULTIMAIL_DATABASE_URL"] = db_url
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(MULTIMAIL + args, env=env, capture_output=True, text=True, timeout=60)


def test_serve_on_a_fresh_machine_prints_keys_and_serves(tmp_path: Path, db_url: str) -> None:
    """First start: data dir created, keys printed one per line with scopes, /health answers,
    and the README's curl walk-through works with the printed admin key."""
    port = free_port()
    # Its own SMTP port too: the default 2525 is taken when the other leg's run of this test
    # is serving at the same moment, and a component that cannot bind stops the process.
    env = env_for(
        tmp_path, db_url, MULTIMAIL_HTTP_PORT=str(port), MULTIMAIL_SMTP_PORT=str(free_port())
    )
    proc = subprocess.Popen(
        [*MULTIMAIL, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "HTTP on" in line:
                break
        output = "".join(lines)
        keys = dict(re.findall(r"^(admin|agent|reviewer) key .*?(mm_live_\S+)$", output, re.M))
        assert set(keys) == {"admin", "agent", "reviewer"}, output
        assert re.search(r"^admin key\s+\(scopes: admin, read\)", output, re.M)
        assert re.search(r"^agent key\s+\(scopes: send, read\)", output, re.M)
        assert re.search(r"^reviewer key \(scopes: oversight, read\)", output, re.M)
        assert "/dashboard" in output
        assert (tmp_path / "fresh").is_dir()
        base = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        while time.monotonic() - started < 30:  # the app is built after that line is printed
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, output + proc.stdout.read()
                time.sleep(0.1)
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        box = httpx.post(
            f"{base}/v1/mailboxes",
            headers=admin,
            json={"address": "support@localhost", "display_name": "Support"},
        )
        assert box.status_code == 201, box.text
        listed = httpx.get(f"{base}/v1/mailboxes", headers=admin).json()["mailboxes"]
        assert [m["address"] for m in listed] == ["support@localhost"]
        contact = httpx.post(
            f"{base}/v1/contacts", headers=admin, json={"email": "jane@example.com", "name": "Jane"}
        )
        assert contact.status_code == 201
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    # Keys are never written to the log of a second start.
    second = subprocess.Popen(
        [*MULTIMAIL, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    time.sleep(0.5)
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=30)
    assert "mm_live_" not in out


def test_local_cli_commands(tmp_path: Path, db_url: str) -> None:
    """init, keys create/list/revoke, mailbox create/list/configure, audit verify, db upgrade,
    user create."""
    env = env_for(tmp_path, db_url)
    init = run(["init", "--account-name", "Acme"], env)
    assert init.returncode == 0, init.stderr
    assert init.stdout.count("mm_live_") == 3
    assert "already initialised" in run(["init"], env).stdout
    created = run(["keys", "create", "ci-bot", "--scopes", "send,read"], env)
    assert created.returncode == 0, created.stderr
    key_id, raw = created.stdout.split()[0], created.stdout.strip().splitlines()[-1]
    assert raw.startswith("mm_live_")
    refused = run(["keys", "create", "bad", "--scopes", "send,oversight"], env)
    assert refused.returncode == 2 and "separation_of_duties" in refused.stderr
    listing = run(["keys", "list"], env).stdout
    assert "ci-bot" in listing and raw not in listing
    assert run(["keys", "revoke", key_id], env).returncode == 0
    assert "revoked" in run(["keys", "list"], env).stdout
    box = run(["mailbox", "create", "help@localhost", "--mode", "autonomous"], env)
    assert box.returncode == 0, box.stderr
    assert "autonomous" in box.stdout  # the operator may choose any mode
    assert "help@localhost" in run(["mailbox", "list"], env).stdout
    configured = run(["mailbox", "configure", "help@localhost", "--mode", "gated_all"], env)
    assert "gated_all" in configured.stdout
    bad = run(["mailbox", "create", "nope"], env)
    assert bad.returncode == 2 and "invalid_address" in bad.stderr
    verify = run(["audit", "verify"], env)
    assert verify.returncode == 0 and "intact" in verify.stdout
    assert run(["db", "upgrade"], env).returncode == 0
    operator = run(["user", "create", "second@localhost", "--password", "a-long-password"], env)
    assert operator.returncode == 0 and "second@localhost" in operator.stdout
    duplicate = run(["user", "create", "second@localhost", "--password", "a-long-password"], env)
    assert duplicate.returncode == 2 and "operator_exists" in duplicate.stderr
