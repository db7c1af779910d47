"""The simulator's raw ASGI application.

Three areas on one port:

* ``/CCSWEB/api/v1/...`` -- the Clinical Conductor API (API key, rate limit, faults, OData);
* ``/_sim/...`` -- the admin API (no key, loopback clients only): clock, mutations, faults,
  stats, ground truth; see :mod:`simulator.admin`;
* ``/metrics`` (Prometheus) and ``/healthz``.

Raw ASGI rather than a framework because the hot path is small and per-request Python is the
cost that matters (≥1,500 small requests/s on one core): route by dict lookup, build the page
vectorised, serialise with orjson, send.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from common.logging import get_logger
from common.metrics import SIM_FAULTS, SIM_RECORDS, SIM_REQUESTS
from simulator.asgi import JSON, send_bytes, send_error
from simulator.data import DataModel, Entity, key_of
from simulator.faults import STATUS_KINDS, FaultDecision, FaultInjector, parse_faults
from simulator.model import ENTITIES
from simulator.odata import ODataError, Query, QueryEngine, parse_query
from simulator.ratelimit import TokenBucketLimiter
from simulator.spec import BASE_PATH, PLACEHOLDER_ENTITY, Route, Router, build_routes, definitions
from simulator.state import SimState

log = get_logger("simulator")

#: Plain lists longer than this are streamed in chunks (``/api/v1/studies`` at scale 1.0 is 157k).
STREAM_CHUNK = 2000
SHAPES = ("spec", "odata", "mixed")


@dataclass
class SimConfig:
    """Everything ``trialsync simulator serve`` can set; passed to workers as JSON."""

    scale: float = 0.01
    seed: int = 42
    host: str = "127.0.0.1"
    port: int = 8765
    latency_ms: float = 0.0
    faults: str | None = None
    api_key: str = ""
    key_header: str = "X-ApiKey"
    rate_limit: float | None = None
    odata_shape: str = "spec"
    workers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class NotFound(Exception):
    """A path that names a record (parent) which does not exist: 404."""


@dataclass
class Page:
    """What an API handler produced: records plus how to wrap them into the body."""

    records: list[Any]
    wrap: Callable[[list[Any]], Any]
    entity: Entity | None = None
    stream: Any = None  # iterator of record chunks for long plain lists


#: the admin API (``simulator.admin.handle_admin``), plugged in by the server that composes the app
AdminHandler = Callable[["Simulator", dict[str, Any], Callable, Callable], Awaitable[None]]


class Simulator:
    """State shared by all requests of one server process."""

    def __init__(self, cfg: SimConfig, admin: AdminHandler | None = None):
        if cfg.odata_shape not in SHAPES:
            raise ValueError(f"odata shape must be one of {', '.join(SHAPES)}, got {cfg.odata_shape!r}")
        if not cfg.api_key:
            raise ValueError("the simulator needs an API key (--api-key or SIM_API_KEY)")
        self.cfg = cfg
        self.admin = admin
        self.model = DataModel(cfg.seed, cfg.scale, definitions(), ENTITIES)
        self.model.warm()
        self.state = SimState(self.model)
        self.engine = QueryEngine(self.model)
        self.routes = build_routes()
        self.router = Router(self.routes)
        self.faults = FaultInjector(cfg.seed, parse_faults(cfg.faults))
        self.limiter = TokenBucketLimiter(cfg.rate_limit) if cfg.rate_limit else None
        self.api_key = cfg.api_key.encode()
        self.key_headers = {cfg.key_header.lower().encode(), b"x-apikey", b"ccapikey"}
        self.stats: dict[str, dict[int, int]] = {}
        self.records_served: dict[str, int] = {}
        self._metric_children: dict[tuple[str, int], Any] = {}
        self._record_children: dict[str, Any] = {}
        self.multi_worker = cfg.workers > 1
        self._shapes = {r.template: self._effective_shape(r) for r in self.routes}

    # -- ASGI -----------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith(BASE_PATH + "/"):
            await self.api(scope, send, path[len(BASE_PATH):])
        elif path.startswith("/_sim/") and self.admin is not None:
            await self.admin(self, scope, receive, send)
        elif path == "/metrics":
            await send_bytes(send, 200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST.encode())
        elif path in ("/healthz", "/readyz"):
            await send_bytes(send, 200, b'{"status":"ok","service":"simulator"}')
        else:
            await send_error(send, 404, "not_found", f"no such path {path}: the API lives under {BASE_PATH}/api/v1")

    # -- the CC API -----------------------------------------------------------------------------
    async def api(self, scope: dict[str, Any], send: Callable, path: str) -> None:
        matched = self.router.match(path)
        route, values = matched if matched else (None, ())
        label = route.template if route else "unmatched"
        key = None
        for name, value in scope["headers"]:
            if name in self.key_headers:
                key = value
                break
        if key is None or not hmac.compare_digest(key, self.api_key):
            self.count(label, 401)
            await send_error(send, 401, "unauthorized",
                             f"missing or invalid API key: send it in the {self.cfg.key_header} header")
            return
        if self.limiter is not None:
            wait = self.limiter.take(key)
            if wait:
                ra = TokenBucketLimiter.retry_after(wait)
                self.count(label, 429)
                await send_error(send, 429, "too_many_requests", f"rate limit of {self.cfg.rate_limit} requests/s exceeded",
                                 [(b"retry-after", str(ra).encode())])
                return
        if scope["method"] not in ("GET", "HEAD"):
            self.count(label, 405)
            await send_error(send, 405, "method_not_allowed", "the simulator serves GET requests only")
            return
        if self.cfg.latency_ms:
            await asyncio.sleep(self.cfg.latency_ms / 1000.0)
        dec = self.faults.decide(label, path) if self.faults.rules else None
        if dec is not None:
            if dec.latency_s:
                SIM_FAULTS.labels("latency").inc()
                await asyncio.sleep(dec.latency_s)
            if dec.kind in STATUS_KINDS:
                status = int(dec.kind)
                SIM_FAULTS.labels(dec.kind).inc()
                self.count(label, status)
                assert dec.rule is not None  # a decision with a kind names its rule
                extra = [(b"retry-after", str(max(1, round(dec.rule.retry_after))).encode())] if status in (429, 503) else []
                await send_error(send, status, "injected_fault", f"simulated HTTP {status}", extra)
                return
            if dec.kind == "reset":
                SIM_FAULTS.labels("reset").inc()
                self.count(label, 0)
                await abort_connection(send)
                return
        if route is None:
            self.count(label, 404)
            await send_error(send, 404, "not_found", f"no endpoint {path} (check the path and the ids in it)")
            return
        if route.kind == "invalid":
            self.count(label, route.status)
            err = "not_implemented" if route.status == 501 else "not_found"
            await send_error(send, route.status, err, f"{route.template}: {route.reason}")
            return
        params = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        try:
            page = self.handle(route, values, params, scope, path)
        except ODataError as e:
            self.count(label, 400)
            await send_error(send, 400, "bad_request", str(e))
            return
        except NotFound as e:
            self.count(label, 404)
            await send_error(send, 404, "not_found", str(e))
            return
        await self.respond(send, label, page, dec)

    def handle(self, route: Route, values: tuple[int, ...], params: dict[str, str], scope: dict[str, Any],
               path: str) -> Page:
        assert route.entity is not None  # only invalid routes have none, and they are answered before
        e = self.model.entity(route.entity)
        parent = self.resolve_parent(route, values)
        if route.kind == "object":
            if route.self_object:
                rec_idx = parent
            elif e.d.singleton:
                if not e.is_alive(0):
                    raise NotFound(f"{route.template}: no record")
                rec_idx = 0
            else:
                live = self.engine.scope(e, parent)
                if not len(live):
                    raise NotFound(f"{route.template}: no record for this {e.parent.name if e.parent else 'path'}")
                rec_idx = int(live[0])
            recs = self.model.build(e, np.asarray([rec_idx], dtype=np.int64))
            return Page(recs, first_record, e)
        q = parse_query(params, e, odata=route.is_odata)
        if route.kind == "list":
            total, idx = self.engine.run(e, parent, q)
            if total > STREAM_CHUNK:
                return Page([], list, e, stream=self._chunks(e, idx))
            return Page(self.model.build(e, idx), list, e)
        total, idx = self.engine.run(e, parent, q)
        records = self.model.build(e, idx)
        more = bool(q.top) and q.skip + len(idx) < total
        link = self.next_link(scope, path, params, q) if more else None
        shape = self._shapes[route.template]
        if shape == "page":
            return Page(records, lambda r: {"Items": r, "Count": total if q.count else None, "NextPageLink": link}, e)
        if shape == "odata":
            ctx = f"{self.base_url(scope)}/$metadata#{e.name}"

            def wrap(r: list[Any]) -> dict[str, Any]:
                body: dict[str, Any] = {"@odata.context": ctx}
                if q.count:
                    body["@odata.count"] = total
                body["value"] = r
                if link:
                    body["@odata.nextLink"] = link
                return body
            return Page(records, wrap, e)
        return Page(records, list, e)

    def _chunks(self, e: Entity, idx: np.ndarray):
        for k in range(0, len(idx), STREAM_CHUNK):
            yield self.model.build(e, idx[k:k + STREAM_CHUNK])

    def resolve_parent(self, route: Route, values: tuple[int, ...]) -> int | None:
        """The index of the record the path's last id names (404 when it does not exist or does
        not belong to the records the earlier ids name)."""
        if not route.placeholders:
            return None
        m = self.model
        pent = m.entity(PLACEHOLDER_ENTITY[route.placeholders[-1]])
        pidx = pent.index_of_id(values[-1])
        if pidx < 0:
            raise NotFound(f"{_singular(pent.name)} {values[-1]} does not exist")
        cur_e, cur = pent, pidx
        for ph, val in zip(reversed(route.placeholders[:-1]), reversed(values[:-1]), strict=True):
            anc = m.entity(PLACEHOLDER_ENTITY[ph])
            while cur_e is not anc:
                assert cur_e.parent is not None, f"{route.template}: {ph} is not an ancestor"
                cur = int(m.parent_of(cur_e, np.asarray([cur], dtype=np.int64))[0])
                cur_e = cur_e.parent
            if anc.index_of_id(val) != cur:
                raise NotFound(f"{_singular(pent.name)} {values[-1]} does not belong to {_singular(anc.name)} {val}")
        return pidx

    async def respond(self, send: Callable, label: str, page: Page, dec: FaultDecision | None) -> None:
        kind = dec.kind if dec is not None else None
        if page.stream is not None:
            if kind is None:
                n = await self._send_stream(send, page)
                self.count(label, 200, n)
                return
            page.records = [r for chunk in page.stream for r in chunk]
        records = page.records
        if kind in ("no_id", "duplicate"):
            assert dec is not None  # kind is dec's
            if records and (kind == "no_id" or page.wrap is not first_record):
                records = self._record_fault(kind, records, page.entity, dec.salt)
                SIM_FAULTS.labels(kind).inc()
            else:
                self.faults.unfire(dec)
                kind = None
        body = orjson.dumps(page.wrap(records))
        n = len(records)
        if kind in ("truncate", "malformed", "drip"):
            assert dec is not None  # kind is dec's
            SIM_FAULTS.labels(kind).inc()
            self.count(label, 200, n)
            await self._body_fault(send, kind, body, dec)
            return
        self.count(label, 200, n)
        await send_bytes(send, 200, body)

    @staticmethod
    def _record_fault(kind: str, records: list[Any], e: Entity | None, salt: int) -> list[Any]:
        records = list(records)
        j = salt % len(records)
        if kind == "duplicate":
            records.insert(j + 1, records[j])
            return records
        rec = records[j]
        if isinstance(rec, dict):
            rec = dict(rec)
            fields = [e.d.id_field, *e.d.key_fields] if e is not None else []
            for f in (*fields, "id", "Id"):
                if f and f in rec:
                    rec.pop(f)
                    break
        else:
            rec = None  # a plain-string list: the "record" is its own key
        records[j] = rec
        return records

    async def _body_fault(self, send: Callable, kind: str, body: bytes, dec: FaultDecision) -> None:
        cut = max(1, int(len(body) * (0.3 + 0.4 * ((dec.salt >> 8) % 1000) / 1000)))
        if kind == "malformed":
            bad = body[:cut] + b'<!-- upstream error: unexpected end of data -->'
            await send_bytes(send, 200, bad)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]})
        if kind == "truncate":
            await send({"type": "http.response.body", "body": body[:min(cut, len(body) - 1)], "more_body": True})
            await abort_connection(send, reset=False)
            return
        rule = dec.rule
        chunks = max(1, rule.chunks if rule else 10)
        pause = (rule.ms if rule else 2000) / 1000.0 / chunks
        step = max(1, -(-len(body) // chunks))
        for k in range(0, len(body), step):
            await send({"type": "http.response.body", "body": body[k:k + step], "more_body": True})
            await asyncio.sleep(pause)
        await send({"type": "http.response.body", "body": b""})

    async def _send_stream(self, send: Callable, page: Page) -> int:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", JSON)]})
        n = 0
        first = True
        for chunk in page.stream:
            if not chunk:
                continue
            data = orjson.dumps(chunk)[1:-1]
            await send({"type": "http.response.body", "body": (b"[" if first else b",") + data, "more_body": True})
            first = False
            n += len(chunk)
        await send({"type": "http.response.body", "body": b"[]" if first else b"]"})
        return n

    # -- helpers ----------------------------------------------------------------------------------
    def _effective_shape(self, r: Route) -> str:
        if r.kind != "odata":
            return r.spec_shape
        if self.cfg.odata_shape == "odata":
            return "odata"
        if self.cfg.odata_shape == "mixed":
            return ("page", "odata", "array")[key_of(self.cfg.seed, "shape", r.template) % 3]
        return r.spec_shape

    def shape_of(self, template: str) -> str:
        return self._shapes[template]

    def base_url(self, scope: dict[str, Any]) -> str:
        host = None
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1")
                break
        if host is None:
            server = scope.get("server") or ("127.0.0.1", self.cfg.port)
            host = f"{server[0]}:{server[1]}"
        return f"{scope.get('scheme', 'http')}://{host}{BASE_PATH}"

    def next_link(self, scope: dict[str, Any], path: str, params: dict[str, str], q: Query) -> str:
        nxt = dict(params)
        nxt["$top"] = str(q.top)
        nxt["$skip"] = str(q.skip + (q.top or 0))
        return f"{self.base_url(scope)}{path}?{urlencode(nxt, quote_via=quote, safe="$,:'()")}"

    def count(self, label: str, status: int, records: int = 0) -> None:
        by = self.stats.setdefault(label, {})
        by[status] = by.get(status, 0) + 1
        child = self._metric_children.get((label, status))
        if child is None:
            child = SIM_REQUESTS.labels(label, str(status) if status else "reset")
            self._metric_children[(label, status)] = child
        child.inc()
        if records:
            self.records_served[label] = self.records_served.get(label, 0) + records
            rc = self._record_children.get(label)
            if rc is None:
                rc = self._record_children[label] = SIM_RECORDS.labels(label)
            rc.inc(records)

    def reset_stats(self) -> None:
        self.stats.clear()
        self.records_served.clear()


def first_record(records: list[Any]) -> Any:
    """Body of an object endpoint: its one record."""
    return records[0] if records else None


def _singular(name: str) -> str:
    return name[:-1].replace("_", " ") if name.endswith("s") else name.replace("_", " ")


async def _lifespan(receive: Callable, send: Callable) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def abort_connection(send: Callable, reset: bool = True) -> None:
    """Drop the TCP connection: ``reset`` sends an RST at once (no response at all); otherwise
    what was sent is flushed and the connection closed (a truncated body). Reaches into
    uvicorn's protocol object -- the only way an ASGI app can drop a connection -- and falls
    back to an error the server turns into a closed connection."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionAbortedError("simulated connection drop")
    if not reset:
        transport.close()
        await asyncio.sleep(0)
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()
    await asyncio.sleep(0)  # let the server notice the disconnect before the app returns
