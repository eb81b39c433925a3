"""Work run in threads that begin together, for tests of what happens at the same moment."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_at_once(count: int, run: Callable[[int, threading.Barrier], None]) -> None:
    """Call ``run(index, start)`` for each index below ``count``, each in a thread of its
    own, and return when all have ended (a minute each at the most).

    ``run`` calls ``start.wait()`` once it is ready (a client opened, a request built): what
    it does after that begins in every thread together.
    """
    start = threading.Barrier(count)
    threads = [threading.Thread(target=run, args=(index, start)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
