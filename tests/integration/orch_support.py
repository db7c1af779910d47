"""Helpers for the orchestrator's integration tests: a freshly migrated warehouse, run rows, a local
SMTP server and a local webhook endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg


def prepare_warehouse() -> None:
    """Migrate the database DATABASE_URL points at and sync the job catalog into it."""
    from common.catalog import load_catalog, sync
    from common.db import migrate

    migrate()
    sync(load_catalog())


def insert_run(conn: psycopg.Connection, job_id: int, status: str, *, error: str | None = None,
               error_class: str | None = None, records: int = 0, minutes_ago: float = 0.0,
               orchestration_id: str | None = None, attempt: int = 1, mode: str = "full") -> int:
    row = conn.execute(
        """INSERT INTO etl.dw_etl_runs (job_id, run_status, mode, trigger, attempt, orchestration_id, records_extracted,
                                        records_published, records_loaded, error_class, error_message, started_at,
                                        completed_at, duration_seconds)
           VALUES (%s, %s, %s, 'test', %s, %s, %s, %s, %s, %s, %s, now() - make_interval(secs => %s),
                   CASE WHEN %s IN ('running', 'pending') THEN NULL ELSE now() - make_interval(secs => %s) + interval '2 s' END,
                   CASE WHEN %s IN ('running', 'pending') THEN NULL ELSE 2 END)
           RETURNING id""",
        (job_id, status, mode, attempt, orchestration_id, records, records, records, error_class, error,
         minutes_ago * 60, status, minutes_ago * 60, status)).fetchone()
    assert row is not None
    if status not in ("running", "pending"):
        conn.execute("""UPDATE etl.dw_etl_jobs SET last_run_id = %s, last_run_status = %s, last_run_at = now(),
                               last_success_at = CASE WHEN %s = 'success' THEN now() ELSE last_success_at END
                         WHERE id = %s""", (row[0], status, status, job_id))
    return int(row[0])


@dataclass
class SmtpSink:
    host: str
    port: int
    messages: list[Any] = field(default_factory=list)


@contextmanager
def smtp_server() -> Iterator[SmtpSink]:
    """A real SMTP server (aiosmtpd) on a free local port, collecting parsed messages."""
    from email import message_from_bytes
    from email.policy import default

    from aiosmtpd.controller import Controller

    from common.stack import free_port

    sink = SmtpSink("127.0.0.1", free_port())

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd API
            sink.messages.append(message_from_bytes(envelope.content, policy=default))
            return "250 OK"

    ctl = Controller(Handler(), hostname=sink.host, port=sink.port)
    ctl.start()
    try:
        yield sink
    finally:
        ctl.stop()


@dataclass
class WebhookSink:
    url: str
    posts: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    status: int = 200


@contextmanager
def webhook_server(path: str = "/services/T0000/B0000/not-a-real-token") -> Iterator[WebhookSink]:
    """A local HTTP endpoint that records Slack-style webhook posts."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    sink = WebhookSink(f"http://127.0.0.1:{httpd.server_address[1]}{path}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            sink.raw.append(body)
            if self.path == path:
                sink.posts.append(json.loads(body))
            self.send_response(sink.status if self.path == path else 404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            return

    httpd.RequestHandlerClass = Handler
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield sink
    finally:
        httpd.shutdown()
        httpd.server_close()
