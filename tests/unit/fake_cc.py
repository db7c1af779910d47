"""A tiny, programmable HTTP server (http.server in a thread) for the API client's unit tests.

Real sockets and real HTTP, so retries, resets, truncated bodies and timeouts are exercised the way
they happen on the wire. Each test installs a ``handler(req) -> Reply`` and reads ``requests``.
Integration tests use the real CC simulator instead.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import orjson


@dataclass
class Req:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw_path: str


@dataclass
class Reply:
    status: int = 200
    body: bytes | object = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: "reset" closes the socket without answering; "truncate" promises more bytes than it sends;
    #: "chunked", "gzip", "close" (close-delimited body) exercise the other framings
    action: str | None = None
    delay: float = 0.0


def json_reply(obj: object, status: int = 200, **headers: str) -> Reply:
    return Reply(status, orjson.dumps(obj), {"Content-Type": "application/json", **headers})


class FakeCC:
    def __init__(self) -> None:
        self.requests: list[Req] = []
        self.handler: Callable[[Req], Reply] = lambda r: json_reply([])
        self._lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                u = urlsplit(self.path)
                req = Req(u.path, dict(parse_qsl(u.query, keep_blank_values=True)),
                          {k: v for k, v in self.headers.items()}, self.path)
                with outer._lock:
                    outer.requests.append(req)
                rep = outer.handler(req)
                if rep.delay:
                    time.sleep(rep.delay)
                if rep.action == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    self.close_connection = True
                    return
                body = rep.body if isinstance(rep.body, bytes) else orjson.dumps(rep.body)
                self.send_response(rep.status)
                for k, v in rep.headers.items():
                    self.send_header(k, v)
                if rep.action == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 7):
                        part = body[i:i + 7]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if rep.action == "gzip":
                    import gzip

                    body = gzip.compress(body)
                    self.send_header("Content-Encoding", "gzip")
                if rep.action == "close":  # no length: the body ends when the connection does
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                if rep.action == "truncate":
                    self.send_header("Content-Length", str(len(body) + 100))
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                return  # clients that hang up mid-answer (timeouts, resets) are part of the tests

        self.httpd = Server(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def odata_entity(records: list[dict], *, shape: str = "odata", with_count: bool = True, next_links: bool = False,
                 cap: int | None = None) -> Callable[[Req], Reply]:
    """A handler serving ``records`` with $top/$skip paging in the chosen response shape."""

    def handler(req: Req) -> Reply:
        top = int(req.query.get("$top", "50"))
        if cap:
            top = min(top, cap)
        skip = int(req.query.get("$skip", "0"))
        chunk = records[skip: skip + top]
        nxt = None
        if next_links and skip + top < len(records):
            nxt = f"{req.path}?$top={top}&$skip={skip + top}"
        if shape == "odata":
            doc: dict[str, object] = {"value": chunk}
            if with_count:
                doc["@odata.count"] = len(records)
            if nxt:
                doc["@odata.nextLink"] = nxt
        else:
            doc = {"Items": chunk, "Count": len(records) if with_count else None, "NextPageLink": nxt}
        return json_reply(doc)

    return handler


def serving() -> Iterator[FakeCC]:
    """Body of a test module's fixture: ``yield from serving()``."""
    srv = FakeCC()
    try:
        yield srv
    finally:
        srv.close()
