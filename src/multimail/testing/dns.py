"""A real authoritative DNS server on 127.0.0.1 for tests (UDP and TCP on one free port).

Point ``MULTIMAIL_DNS_RESOLVER`` at :attr:`LocalDNSServer.address` and publish the records a
test needs (MX, SPF/DKIM TXT, A); records can change while the server runs.

    with LocalDNSServer() as dns_server:
        dns_server.add_record("example.test", "MX", "10 mx.example.test.")
        dns_server.add_record("mx.example.test", "A", "127.0.0.1")
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, TXT, A, DNSLabel, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from multimail.errors import InvalidInput

__all__ = ["SUPPORTED_TYPES", "LocalDNSServer"]

SUPPORTED_TYPES = frozenset({"A", "AAAA", "MX", "TXT", "CNAME"})

# RFC 1035 §3.3.14: one character-string holds at most 255 octets.
_TXT_CHUNK = 255
# A CNAME chain longer than this inside one test zone is a loop, not a chain.
_MAX_CNAME_HOPS = 8

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Record:
    rtype: str
    rdata: Any
    ttl: int


def _normalise_name(name: str) -> str:
    cleaned = name.strip().rstrip(".").lower()
    if not cleaned or any(ch.isspace() for ch in cleaned):
        raise InvalidInput(f"not a DNS name: {name!r}", code="invalid_dns_name")
    return cleaned


def _txt_chunks(value: str) -> list[bytes]:
    raw = value.encode("utf-8")
    if not raw:
        return [b""]
    return [raw[i : i + _TXT_CHUNK] for i in range(0, len(raw), _TXT_CHUNK)]


def _make_rdata(rtype: str, value: str) -> Any:
    try:
        if rtype == "A":
            return A(str(ipaddress.IPv4Address(value.strip())))
        if rtype == "AAAA":
            return AAAA(str(ipaddress.IPv6Address(value.strip())))
        if rtype == "MX":
            preference, exchange = value.split()
            return MX(exchange, int(preference))
        if rtype == "CNAME":
            return CNAME(value.strip())
        return TXT(_txt_chunks(value))
    except ValueError as exc:
        raise InvalidInput(
            f"bad {rtype} value {value!r}: {exc}", code="invalid_dns_record"
        ) from exc


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    """Answers from an in-memory table; one instance serves every handler thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, list[_Record]] = {}

    def add(self, name: str, record: _Record) -> None:
        with self._lock:
            self._records.setdefault(name, []).append(record)

    def remove(self, name: str, rtype: str | None) -> None:
        with self._lock:
            kept = [
                r for r in self._records.get(name, []) if rtype is not None and r.rtype != rtype
            ]
            if kept:
                self._records[name] = kept
            else:
                self._records.pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        reply.header.aa = 1
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE.get(request.q.qtype)
        with self._lock:
            if qname not in self._records:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            for rr in self._answers(qname, qtype):
                reply.add_answer(rr)
        return reply

    def _answers(self, qname: str, qtype: str) -> list[RR]:
        answers: list[RR] = []
        name = qname
        for _ in range(_MAX_CNAME_HOPS):
            records = self._records.get(name, [])
            matching = [r for r in records if qtype in (r.rtype, "ANY")]
            answers.extend(self._rr(name, r) for r in matching)
            aliases = [r for r in records if r.rtype == "CNAME"]
            if matching or not aliases:
                break
            answers.append(self._rr(name, aliases[0]))
            name = str(aliases[0].rdata.label).rstrip(".").lower()
        return answers

    @staticmethod
    def _rr(name: str, record: _Record) -> RR:
        return RR(
            DNSLabel(name + "."),
            getattr(QTYPE, record.rtype),
            rdata=record.rdata,
            ttl=record.ttl,
        )


class LocalDNSServer:
    """A DNS server for one test zone, answering on 127.0.0.1 over UDP and TCP.

    Unknown names answer NXDOMAIN; a known name asked for a type it lacks answers NOERROR
    with no records. Safe to change records from the test thread while it serves.
    """

    host = "127.0.0.1"

    def __init__(self) -> None:
        self._resolver = _ZoneResolver()
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("LocalDNSServer is not running")
        return self._port

    @property
    def address(self) -> str:
        """``host:port``, the format of the ``MULTIMAIL_DNS_RESOLVER`` setting."""
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        if self._servers:
            raise RuntimeError("LocalDNSServer is already running")
        # The UDP port is chosen by the kernel; TCP has to follow it, and on the rare
        # occasion that port is taken for TCP we simply take another UDP port.
        for _ in range(20):
            udp = self._make_server(0, tcp=False)
            port = int(udp.server.server_address[1])
            try:
                tcp = self._make_server(port, tcp=True)
            except OSError:
                udp.server.server_close()
                continue
            self._servers = [udp, tcp]
            self._port = port
            for server in self._servers:
                # A short poll interval keeps stop() quick (socketserver's default is 0.5 s).
                thread = threading.Thread(
                    target=server.server.serve_forever,
                    kwargs={"poll_interval": 0.05},
                    name=f"LocalDNSServer-{port}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
            return
        raise RuntimeError("could not find a port free for both UDP and TCP")

    def _make_server(self, port: int, *, tcp: bool) -> DNSServer:
        # Only decoding errors are worth hearing about, and only at debug level.
        logger = DNSLogger(log="error", prefix=False, logf=_log.debug)
        return DNSServer(self._resolver, address=self.host, port=port, tcp=tcp, logger=logger)

    def stop(self) -> None:
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers = []
        self._threads = []
        self._port = None

    def __enter__(self) -> LocalDNSServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def add_record(self, name: str, rtype: str, value: str, ttl: int = 60) -> None:
        """Publish one record, e.g. ``add_record("example.test", "MX", "10 mx.example.test.")``.

        TXT values longer than 255 bytes are split into several character-strings, as
        DKIM keys are published; resolvers join them back.
        """
        kind = rtype.upper()
        if kind not in SUPPORTED_TYPES:
            raise InvalidInput(f"unsupported record type {rtype!r}", code="invalid_dns_record")
        if ttl < 0:
            raise InvalidInput("ttl must not be negative", code="invalid_dns_record")
        self._resolver.add(_normalise_name(name), _Record(kind, _make_rdata(kind, value), ttl))

    def remove_records(self, name: str, rtype: str | None = None) -> None:
        """Withdraw a name's records of one type, or every record of the name."""
        self._resolver.remove(_normalise_name(name), rtype.upper() if rtype else None)

    def clear(self) -> None:
        self._resolver.clear()
