"""Instructions per accepted send (callgrind): a figure the machine's load does not move.

    .venv/bin/python bench/send_instructions.py [--few 10] [--many 60] [--mode autonomous]

Runs this script under ``valgrind --tool=callgrind`` twice, sending ``--few`` and then
``--many`` messages through the real app in one process (Starlette's TestClient, SQLite),
and prints the difference per send: the instructions one send costs, client side included
(the same for every version of the server, so differences are the server's). Slow (valgrind
runs Python some 50 times slower); ``--run N`` is the inner mode that does the sending.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(count: int, mode: str) -> None:
    from fastapi.testclient import TestClient
    from send_setup import send_body, send_world

    from multimail.api.app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        services, boot, box = send_world(Path(tmp) / "mm", mode)
        headers = {"Authorization": f"Bearer {boot.agent_key}"}
        with TestClient(create_app(services)) as client:
            for n in range(count + 3):  # three to warm caches
                response = client.post(
                    f"/v1/mailboxes/{box}/send", json=send_body(n), headers=headers
                )
                assert response.status_code == 202, response.text
        services.db.dispose()


def _instructions(count: int, mode: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--run",
            str(count),
            "--mode",
            mode,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", result.stderr)
        if found is None:
            raise SystemExit(result.stderr[-2000:])
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--few", type=int, default=10)
    parser.add_argument("--many", type=int, default=60)
    parser.add_argument("--mode", default="autonomous")
    parser.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:
        _run(args.run, args.mode)
        return
    few = _instructions(args.few, args.mode)
    many = _instructions(args.many, args.mode)
    per_send = (many - few) / (args.many - args.few)
    print(f"{per_send / 1e6:.2f} M instructions per send ({args.mode}, TestClient, SQLite)")


if __name__ == "__main__":
    main()
