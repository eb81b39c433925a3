"""``multimail serve`` in a process of its own, on this machine, for tests and benchmarks.

Several processes sharing one database is how MultiMail scales out, and a process can be
SIGKILLed, which an in-process :class:`~multimail.testing.server.LiveServer` cannot:

    with ServeProcess(services.settings, "api", tmp / "api.log") as api:
        api.wait_ready()
        httpx.get(f"{api.base_url}/health")

The child gets the settings' data dir, database, domain, relay and rate limits through
``MULTIMAIL_*`` variables (none of this process's own ``MULTIMAIL_*`` leak in); keyword
arguments set further settings. HTTP and SMTP listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path

import httpx

from multimail.config import Settings

SERVE = [sys.executable, "-m", "multimail", "serve"]
_LISTENS_HTTP = {"all", "api"}
_LISTENS_SMTP = {"all", "smtp"}


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_env(settings: Settings, **values: str | int | None) -> dict[str, str]:
    """The environment of a ``serve`` child running on ``settings``; ``values`` are further
    settings by field name (``http_port=8001``), ``None`` meaning "leave the default"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTIMAIL_")}
    env.update(
        MULTIMAIL_DATA_DIR=str(settings.data_dir),
        MULTIMAIL_DATABASE_URL=settings.effective_database_url,
        MULTIMAIL_DOMAIN=settings.domain,
        MULTIMAIL_RATE_LIMIT_PER_MINUTE=str(settings.rate_limit_per_minute),
        MULTIMAIL_RATE_LIMIT_BURST=str(settings.rate_limit_burst),
    )
    if settings.smtp_url is not None:
        env["MULTIMAIL_SMTP_URL"] = settings.smtp_url.get_secret_value()
    env.update({f"MULTIMAIL_{k.upper()}": str(v) for k, v in values.items() if v is not None})
    return env


class ServeProcess(AbstractContextManager["ServeProcess"]):
    """One ``multimail serve --role <role>`` child writing its output to ``log`` (a file, or
    a directory to make a new file in).

    An ``api`` or ``all`` process gets a free HTTP port and an ``smtp`` or ``all`` one a free
    SMTP port unless ``values`` name one.
    """

    def __init__(
        self, settings: Settings, role: str, log: Path, **values: str | int | None
    ) -> None:
        if role in _LISTENS_HTTP and values.get("http_port") is None:
            values["http_port"] = free_port()
        if role in _LISTENS_SMTP and values.get("smtp_port") is None:
            values["smtp_port"] = free_port()
        if log.is_dir():
            handle, name = tempfile.mkstemp(prefix=f"serve-{role}-", suffix=".log", dir=log)
            os.close(handle)
            log = Path(name)
        self.role = role
        self.log = log
        self.http_port = int(values["http_port"] or 0) if role in _LISTENS_HTTP else None
        self.smtp_port = int(values["smtp_port"] or 0) if role in _LISTENS_SMTP else None
        self._output = log.open("ab")
        self.proc = subprocess.Popen(
            [*SERVE, "--role", role],
            env=serve_env(settings, **values),
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        if self.http_port is None:
            raise ValueError(f"a {self.role} process serves no HTTP")
        return f"http://127.0.0.1:{self.http_port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, chars: int = 3000) -> str:
        """The end of what the process printed (its log)."""
        self._output.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def ready(self) -> bool:
        """Everything it listens on answers: ``/health`` with 200, SMTP with its 220."""
        if self.http_port is not None and not _healthy(self.base_url):
            return False
        return self.smtp_port is None or _greets(self.smtp_port)

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until :meth:`ready`; RuntimeError with its output if it exits or is slow.
        A worker listens on nothing, so it is ready once started."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.alive():
                raise RuntimeError(
                    f"serve --role {self.role} exited during start-up:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"serve --role {self.role} was not ready in {timeout:.0f} s:\n{self.output()}"
                )
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as after a power cut or the OOM killer."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._output.close()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL if it takes longer than ``timeout``."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._output.close()

    def rss_kib(self) -> int:
        """Resident memory now (0 once the process is gone)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            if conn.recv(64).startswith(b"220"):
                conn.sendall(b"QUIT\r\n")
                return True
    except OSError:
        pass
    return False
