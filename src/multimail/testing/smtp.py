"""A real SMTP server on 127.0.0.1 that records what it accepts, for tests.

It stands in for the relay or the recipient's MX host. Tests read what arrived byte for
byte, and flip its behaviour while it runs to reproduce what real servers do: refuse at
MAIL, RCPT or DATA with a chosen reply, or read a whole message and hang up without
answering (Postfix's ``smtp-sink -q .``), the one case where a sender cannot know whether
its message arrived.

    with CapturingSMTPServer() as smtp_server:
        ...  # send to smtp_server.host, smtp_server.port
        [message] = smtp_server.wait_for(1, timeout=5)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import hmac
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["CapturedMessage", "CapturingSMTPServer", "Stage"]

Stage = Literal["mail", "rcpt", "data"]


class _DropLoginDataNotice(logging.Filter):
    """aiosmtpd warns about its own deprecated attribute on every successful AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


_AIOSMTPD_LOG = logging.getLogger("mail.log")
if not any(isinstance(f, _DropLoginDataNotice) for f in _AIOSMTPD_LOG.filters):
    _AIOSMTPD_LOG.addFilter(_DropLoginDataNotice())


@dataclass
class CapturedMessage:
    """One message the server answered (or, after a hang-up, would have answered) 250 to."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    received_at: dt.datetime
    peer: tuple[str, int]
    helo: str | None = None
    tls: bool = False
    auth_user: str | None = None
    mail_options: list[str] = field(default_factory=list)

    def as_email(self) -> EmailMessage:
        """The data parsed as an RFC 5322 message."""
        return email.message_from_bytes(self.data, policy=email.policy.default)


@dataclass
class _Failure:
    code: int
    message: str
    only_for: frozenset[str] | None
    remaining: int | None

    def applies_to(self, addresses: Iterable[str]) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.only_for is None:
            return True
        return any(address.lower() in self.only_for for address in addresses)

    def consume(self) -> str:
        if self.remaining is not None:
            self.remaining -= 1
        return f"{self.code} {self.message}"


class _Handler:
    """aiosmtpd hooks; every piece of state lives in the owning server, behind its lock."""

    def __init__(self, owner: CapturingSMTPServer) -> None:
        self._owner = owner

    async def handle_MAIL(
        self,
        server: Any,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        refusal = self._owner._refusal("mail", [address])
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: Any,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self._owner._refusal("rcpt", [address])
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        refusal = self._owner._refusal("data", envelope.rcpt_tos)
        if refusal is not None:
            return refusal
        peer = session.peer if isinstance(session.peer, tuple) else (str(session.peer), 0)
        # aiosmtpd hands over the null reverse-path (bounces) as "<>"; record it as "".
        mail_from = envelope.mail_from or ""
        captured = CapturedMessage(
            mail_from="" if mail_from == "<>" else mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            received_at=dt.datetime.now(dt.UTC),
            peer=(str(peer[0]), int(peer[1])),
            helo=session.host_name,
            tls=session.ssl is not None
            or server.transport.get_extra_info("sslcontext") is not None,
            auth_user=session.auth_data if isinstance(session.auth_data, str) else None,
            mail_options=list(envelope.mail_options),
        )
        self._owner._record(captured)
        if self._owner._take_hang_up():
            # Closing before aiosmtpd writes its reply: the client sent everything and
            # never learns the outcome. aiosmtpd's write then goes nowhere.
            server.transport.close()
        return "250 OK: queued"


class _FreePortController(Controller):  # type: ignore[misc]
    """aiosmtpd's Controller, bound to a port the kernel picks (it wants a fixed one)."""

    def _create_server(self) -> Any:
        async def bind() -> asyncio.AbstractServer:
            server = await self.loop.create_server(
                self._factory_invoker, host=self.hostname, port=0, ssl=self.ssl_context
            )
            self.port = server.sockets[0].getsockname()[1]
            return server

        return bind()


def _write_self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class CapturingSMTPServer:
    """An aiosmtpd server on a free loopback port that keeps every message it accepts.

    ``tls=True`` offers STARTTLS with a fresh self-signed certificate for ``localhost`` /
    127.0.0.1 (see :meth:`client_tls_context`); ``implicit_tls=True`` speaks TLS from the
    first byte instead, like port 465. ``auth=(user, password)`` requires AUTH
    PLAIN or LOGIN before MAIL; aiosmtpd only offers AUTH inside TLS unless
    ``auth_require_tls=False``. ``spool_dir`` also writes each message there as ``.eml``.
    """

    def __init__(
        self,
        *,
        hostname: str = "127.0.0.1",
        spool_dir: str | os.PathLike[str] | None = None,
        tls: bool = False,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        auth: tuple[str, str] | None = None,
        auth_require_tls: bool = True,
        data_size_limit: int | None = None,
    ) -> None:
        self.hostname = hostname
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        if tls and implicit_tls:
            raise ValueError("choose STARTTLS (tls=True) or implicit TLS, not both")
        self._tls = tls
        self._implicit_tls = implicit_tls
        self._require_starttls = require_starttls
        self._auth = auth
        self._auth_require_tls = auth_require_tls
        self._data_size_limit = data_size_limit
        self._changed = threading.Condition()
        self._messages: list[CapturedMessage] = []
        self._failures: dict[Stage, _Failure] = {}
        self._hang_ups: int | None = 0
        self._spooled = 0
        self._controller: _FreePortController | None = None
        self._cert_dir: tempfile.TemporaryDirectory[str] | None = None
        self._cert_pem: bytes | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("CapturingSMTPServer is already running")
        if self.spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {
            # aiosmtpd only counts STARTTLS as TLS; an implicit-TLS connection is one too.
            "auth_require_tls": self._auth_require_tls and not self._implicit_tls,
            "require_starttls": self._require_starttls,
        }
        if self._data_size_limit is not None:
            kwargs["data_size_limit"] = self._data_size_limit
        if self._tls:
            kwargs["tls_context"] = self._server_tls_context()
        if self._implicit_tls:
            kwargs["ssl_context"] = self._server_tls_context()
        if self._auth is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
        controller = _FreePortController(
            _Handler(self), hostname=self.hostname, server_hostname="capture.test", **kwargs
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._cert_dir is not None:
            self._cert_dir.cleanup()
            self._cert_dir = None

    def __enter__(self) -> CapturingSMTPServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self.hostname

    @property
    def port(self) -> int:
        if self._controller is None:
            raise RuntimeError("CapturingSMTPServer is not running")
        return int(self._controller.port)

    # -- TLS and AUTH ----------------------------------------------------------------

    def _server_tls_context(self) -> ssl.SSLContext:
        self._cert_dir = tempfile.TemporaryDirectory(prefix="multimail-smtp-tls-")
        cert_path, key_path = _write_self_signed(Path(self._cert_dir.name))
        self._cert_pem = cert_path.read_bytes()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        return context

    @property
    def certificate_pem(self) -> bytes:
        if self._cert_pem is None:
            raise RuntimeError("the server was not started with TLS")
        return self._cert_pem

    def client_tls_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this server's self-signed certificate."""
        return ssl.create_default_context(cadata=self.certificate_pem.decode("ascii"))

    def _authenticate(
        self, server: Any, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self._auth is not None
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = self._auth
        good_user = hmac.compare_digest(auth_data.login, user.encode("utf-8"))
        good_password = hmac.compare_digest(auth_data.password, password.encode("utf-8"))
        if good_user and good_password:
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)

    # -- behaviour switches ----------------------------------------------------------

    def fail_with(
        self,
        code: int,
        message: str,
        stage: Stage = "rcpt",
        *,
        only_for: Iterable[str] | None = None,
        times: int | None = None,
    ) -> None:
        """Answer ``code message`` at ``stage`` instead of accepting.

        ``only_for`` limits the refusal to those addresses: the sender at ``mail``, each
        recipient at ``rcpt`` (a mixed outcome), any recipient at ``data``.
        ``times`` limits how many refusals are given before accepting again.
        """
        if not 400 <= code <= 599:
            raise ValueError("a refusal code is 4xx or 5xx")
        if stage not in ("mail", "rcpt", "data"):
            raise ValueError(f"unknown stage {stage!r}")
        targets = frozenset(a.lower() for a in only_for) if only_for is not None else None
        with self._changed:
            self._failures[stage] = _Failure(code, message, targets, times)

    def hang_up_after_data(self, times: int | None = None) -> None:
        """Read each message whole, then close the connection without replying.

        The message is recorded: the receiver has it, the sender just never hears so.
        ``times`` limits how many sessions are cut; None means until reset.
        """
        with self._changed:
            self._hang_ups = times

    def reset_behaviour(self) -> None:
        """Accept everything again."""
        with self._changed:
            self._failures.clear()
            self._hang_ups = 0

    def _refusal(self, stage: Stage, addresses: Iterable[str]) -> str | None:
        with self._changed:
            failure = self._failures.get(stage)
            if failure is None or not failure.applies_to(addresses):
                return None
            return failure.consume()

    def _take_hang_up(self) -> bool:
        with self._changed:
            if self._hang_ups is None:
                return True
            if self._hang_ups > 0:
                self._hang_ups -= 1
                return True
            return False

    # -- what arrived ----------------------------------------------------------------

    def _record(self, message: CapturedMessage) -> None:
        with self._changed:
            self._messages.append(message)
            self._spooled += 1
            index = self._spooled
            self._changed.notify_all()
        if self.spool_dir is not None:
            final = self.spool_dir / f"{index:06d}.eml"
            partial = final.with_suffix(".eml.part")
            partial.write_bytes(message.data)
            os.replace(partial, final)

    @property
    def messages(self) -> list[CapturedMessage]:
        """A snapshot of every message accepted so far, in arrival order."""
        with self._changed:
            return list(self._messages)

    def clear(self) -> None:
        with self._changed:
            self._messages.clear()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[CapturedMessage]:
        """Block until at least ``count`` messages arrived; TimeoutError after ``timeout`` s."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(
                    f"expected {count} message(s) within {timeout} s, got {len(self._messages)}"
                )
            return list(self._messages)
