"""Shared by the examples: the server and keys come from the environment.

export MULTIMAIL_API_URL=http://127.0.0.1:8000
export MULTIMAIL_API_KEY=mm_live_…          # the agent key printed by `multimail serve`
export MULTIMAIL_REVIEWER_KEY=mm_live_…     # the reviewer key (examples that approve)
export MULTIMAIL_FROM=agent@localhost       # a mailbox of yours
"""

from __future__ import annotations

import os
import sys

BASE_URL = os.environ.get("MULTIMAIL_API_URL", "http://127.0.0.1:8000").rstrip("/")
API_KEY = os.environ.get("MULTIMAIL_API_KEY", "")
REVIEWER_KEY = os.environ.get("MULTIMAIL_REVIEWER_KEY", "")
ADMIN_KEY = os.environ.get("MULTIMAIL_ADMIN_KEY", "")
FROM = os.environ.get("MULTIMAIL_FROM", "")

if not API_KEY or not FROM:
    sys.exit("set MULTIMAIL_API_KEY and MULTIMAIL_FROM (see the docstring of examples/_common.py)")
