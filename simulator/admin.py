"""The admin API under ``/_sim/`` (no API key; loopback clients only; never faulted).

=====================================  ==========================================================
``GET  /_sim/health``                  liveness
``GET  /_sim/info``                    seed, scale, shapes, clock, entities, routes
``GET  /_sim/entities``                entity -> base / live / inserted / deleted counts
``GET  /_sim/clock``                   the simulated clock
``POST /_sim/clock``                   ``{"advance_seconds": N}``
``POST /_sim/mutate``                  ``{"entity"|"endpoint", "modify", "insert", "delete", ...}`` (uniform)
                                       or ``{"model": "realistic", "days"|"fraction", "touch_parents"}``
``GET|POST|DELETE /_sim/faults``       list / set (``{"spec"}`` or ``{"rules"}``, ``append``) / clear
``GET|DELETE /_sim/stats``             requests per route template and status; reset
``GET  /_sim/expected?endpoint=T``     NDJSON ``{"params", "record"}`` of every record endpoint T
                                       returns over all its valid parents (``job=N`` works too)
``GET  /_sim/parents?endpoint=T``      NDJSON of every valid parameter set of T (with or without
                                       children)
``GET  /_sim/counts``                  records and parent counts per endpoint template
=====================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import numpy as np
import orjson

from simulator.activity import realistic
from simulator.asgi import send_bytes, send_error
from simulator.faults import FaultSpecError, parse_faults, rules_from_json
from simulator.spec import PLACEHOLDER_ENTITY, Route
from simulator.state import MutationError

if TYPE_CHECKING:  # the app calls us with itself; importing it at run time would be a loop
    from simulator.app import Simulator

NDJSON = b"application/x-ndjson"
_BATCH = 5000
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


async def handle_admin(sim: Simulator, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
    client = scope.get("client")
    if client and client[0] not in _LOOPBACK and not client[0].startswith("127."):
        await send_error(send, 403, "forbidden", "the admin API answers loopback clients only")
        return
    path = scope["path"].rstrip("/")
    method = scope["method"]
    params = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
    try:
        body = await _read_json(receive) if method in ("POST", "PUT") else {}
        if method not in ("GET", "HEAD") and sim.multi_worker and path != "/_sim/stats":
            await send_error(send, 409, "conflict",
                             "admin changes need a single-worker simulator (--workers 1): each worker has its own state")
            return
        handler = _ROUTES.get((method if method != "HEAD" else "GET", path))
        if handler is None:
            await send_error(send, 404, "not_found", f"no admin endpoint {method} {path}: see simulator/README.md")
            return
        result = handler(sim, params, body)
        if isinstance(result, Iterator):
            await _stream(send, result)
        else:
            await send_bytes(send, 200, orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS))
    except (MutationError, FaultSpecError, ValueError, KeyError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        await send_error(send, 400, "bad_request", msg)


async def _read_json(receive: Callable) -> dict[str, Any]:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"request body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("request body must be a JSON object")
    return data


async def _stream(send: Callable, lines: Iterator[bytes]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", NDJSON)]})
    buf: list[bytes] = []
    size = 0
    for line in lines:
        buf.append(line)
        size += len(line)
        if size >= 1 << 20:
            await send({"type": "http.response.body", "body": b"".join(buf), "more_body": True})
            buf, size = [], 0
    await send({"type": "http.response.body", "body": b"".join(buf)})


# -- handlers ------------------------------------------------------------------------------------
def _health(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    return {"status": "ok", "seed": sim.cfg.seed, "scale": sim.cfg.scale, "pid": _pid()}


def _pid() -> int:
    import os

    return os.getpid()


def _entities(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name in sim.model.defs:
        e = sim.model.entity(name)
        out[name] = {"base": e.n_base, "live": e.n_live, "inserted": len(e.ins_parent), "deleted": e.n_deleted,
                     "parent": e.d.parent, "id_field": e.d.id_field, "timestamp_field": e.d.ts_field,
                     "created_field": e.d.created_field, "version": e.version}
    return out


def _info(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    cfg = sim.cfg
    return {
        "seed": cfg.seed, "scale": cfg.scale, "odata_shape": cfg.odata_shape, "key_header": cfg.key_header,
        "rate_limit": cfg.rate_limit, "latency_ms": cfg.latency_ms, "workers": cfg.workers,
        "clock": sim.state.clock_iso, "mutations": sim.state.seq, "log": sim.state.log[-100:],
        "entities": _entities(sim, params, body),
        "routes": [{"template": r.template, "kind": r.kind, "entity": r.entity, "jobs": list(r.jobs),
                    "status": r.status, "shape": sim.shape_of(r.template), "spec_shape": r.spec_shape,
                    "in_spec": r.in_spec} for r in sim.routes],
    }


def _clock(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    return {"clock": sim.state.clock_iso, "epoch_ms": sim.state.clock_ms}


def _clock_post(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    seconds = body.get("advance_seconds", params.get("advance_seconds"))
    if seconds is None:
        raise ValueError("POST /_sim/clock needs {\"advance_seconds\": N}")
    sim.state.advance(float(seconds))
    return _clock(sim, params, body)


_MUTATE_KEYS = {"entity", "endpoint", "modify", "insert", "delete", "modify_count", "insert_count", "delete_count",
                "modify_ids", "delete_ids", "parent_id", "spread_ms", "touch_parents", "model"}
#: the realistic model (simulator/activity.py) takes these instead of an entity and fractions
_REALISTIC_KEYS = {"model", "days", "fraction", "touch_parents"}
MODELS = ("uniform", "realistic")


def _mutate(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    model = body.get("model") or "uniform"
    if model not in MODELS:
        raise ValueError(f"unknown change model {model!r}: use one of {', '.join(MODELS)}")
    if model == "realistic":
        unknown = set(body) - _REALISTIC_KEYS
        if unknown:
            raise ValueError(f"the realistic model takes {sorted(_REALISTIC_KEYS)}, not {sorted(unknown)} "
                             "(it picks the records itself: days of activity on active studies)")
        return realistic(sim.state, days=body.get("days"), fraction=body.get("fraction"),
                                   touch_parents=bool(body.get("touch_parents")))
    unknown = set(body) - _MUTATE_KEYS
    if unknown:
        raise ValueError(f"unknown mutation keys {sorted(unknown)}: use {sorted(_MUTATE_KEYS)}")
    entity = body.get("entity")
    if entity is None and body.get("endpoint"):
        route = sim.router.by_template.get(body["endpoint"])
        if route is None or route.entity is None:
            raise ValueError(f"unknown endpoint template {body['endpoint']!r}: see GET /_sim/info routes")
        entity = route.entity
    if not entity:
        raise ValueError("name the records to change: {\"entity\": ...} or {\"endpoint\": <template>}")
    kwargs = {k: body[k] for k in _MUTATE_KEYS - {"entity", "endpoint", "model"} if k in body and body[k] is not None}
    res = sim.state.mutate(entity, **kwargs)
    return res.as_dict()


def _faults_get(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    return {"rules": sim.faults.describe(), "injected": dict(sim.faults.injected)}


def _faults_post(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    if "spec" in body:
        rules = parse_faults(body["spec"])
    elif "rules" in body:
        rules = rules_from_json(body["rules"])
    else:
        raise ValueError("POST /_sim/faults needs {\"spec\": \"...\"} or {\"rules\": [...]}")
    sim.faults.set(rules, append=bool(body.get("append")))
    return _faults_get(sim, params, body)


def _faults_delete(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    sim.faults.clear()
    return _faults_get(sim, params, body)


def _stats(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    requests = {label: {(str(k) if k else "reset"): v for k, v in sorted(by.items())}
                for label, by in sorted(sim.stats.items())}
    return {"requests": requests, "records": dict(sorted(sim.records_served.items())),
            "faults": dict(sim.faults.injected), "total_requests": sum(sum(b.values()) for b in sim.stats.values())}


def _stats_delete(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    sim.reset_stats()
    return _stats(sim, params, body)


# -- ground truth ---------------------------------------------------------------------------------
def route_for(sim: Simulator, params: dict[str, str]) -> Route:
    """The route named by ``endpoint=<template>`` or ``job=<id>``."""
    if "job" in params:
        from schemas.jobs import JobCatalog

        job = JobCatalog.load().get(int(params["job"]))
        template = job.endpoint
    else:
        template = params.get("endpoint", "")
    route = sim.router.by_template.get(template)
    if route is None:
        raise ValueError(f"unknown endpoint template {template!r}: pass endpoint=<template as in the job "
                         "catalog, with {placeholders}> or job=<id>")
    if route.kind == "invalid":
        raise ValueError(f"{template} is an invalid endpoint (HTTP {route.status}): it returns no records")
    return route


def reachable(sim: Simulator, route: Route) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Indices of every record the route serves over all valid parents, with the parameter values
    (ids) per record -- exactly what the API answers, mutations included."""
    m = sim.model
    assert route.entity is not None  # route_for answers served routes only
    e = m.entity(route.entity)
    idx = sim.engine.scope(e, None)
    if not route.placeholders:
        if route.kind == "object" and e.d.singleton:
            idx = idx[:1]
        return idx, {}
    if route.self_object:
        return idx, {route.placeholders[-1]: e.d.id_base + idx}
    params: dict[str, np.ndarray] = {}
    cur_e, cur = e, idx
    mask = np.ones(len(idx), dtype=bool)
    for ph in reversed(route.placeholders):
        anc = m.entity(PLACEHOLDER_ENTITY[ph])
        while cur_e is not anc:
            cur = m.parent_of(cur_e, cur)
            assert cur_e.parent is not None  # the placeholder names an ancestor of the route's entity
            cur_e = cur_e.parent
        mask &= anc.live_mask(cur)
        params[ph] = anc.d.id_base + cur
    idx = idx[mask]
    params = {k: v[mask] for k, v in params.items()}
    if route.kind == "object":  # one record per parent: the first live child
        key = params[route.placeholders[-1]]
        _, first = np.unique(key, return_index=True)
        first.sort()
        idx = idx[first]
        params = {k: v[first] for k, v in params.items()}
    return idx, {k: params[k] for k in route.placeholders}


def _expected(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> Iterator[bytes]:
    route = route_for(sim, params)
    idx, pvals = reachable(sim, route)
    assert route.entity is not None  # route_for answers served routes only
    e = sim.model.entity(route.entity)
    names = list(pvals)

    def lines() -> Iterator[bytes]:
        for k in range(0, len(idx), _BATCH):
            recs = sim.model.build(e, idx[k:k + _BATCH])
            cols = [pvals[n][k:k + _BATCH].tolist() for n in names]
            for j, rec in enumerate(recs):
                p = {n: cols[c][j] for c, n in enumerate(names)}
                yield orjson.dumps({"params": p, "record": rec}) + b"\n"
    return lines()


def _parents(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> Iterator[bytes]:
    route = route_for(sim, params)
    names, cols = _parent_sets(sim, route)

    def lines() -> Iterator[bytes]:
        for row in zip(*(c.tolist() for c in cols), strict=True):
            yield orjson.dumps(dict(zip(names, row, strict=True))) + b"\n"
    return lines()


def _parent_sets(sim: Simulator, route: Route) -> tuple[list[str], list[np.ndarray]]:
    """Every valid parameter combination of a route (parents with and without children)."""
    if not route.placeholders:
        return [], []
    m = sim.model
    last = m.entity(PLACEHOLDER_ENTITY[route.placeholders[-1]])
    idx = sim.engine.scope(last, None)
    cols = {route.placeholders[-1]: last.d.id_base + idx}
    cur_e, cur = last, idx
    mask = np.ones(len(idx), dtype=bool)
    for ph in reversed(route.placeholders[:-1]):
        anc = m.entity(PLACEHOLDER_ENTITY[ph])
        while cur_e is not anc:
            cur = m.parent_of(cur_e, cur)
            assert cur_e.parent is not None  # the placeholder names an ancestor of the route's entity
            cur_e = cur_e.parent
        mask &= anc.live_mask(cur)
        cols[ph] = anc.d.id_base + cur
    names = list(route.placeholders)
    return names, [cols[n][mask] for n in names]


def _counts(sim: Simulator, params: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for r in sim.routes:
        if r.kind == "invalid":
            out[r.template] = {"status": r.status, "jobs": list(r.jobs), "records": 0, "parents": None}
            continue
        idx, _ = reachable(sim, r)
        parents = len(_parent_sets(sim, r)[1][0]) if r.placeholders else None
        out[r.template] = {"status": 200, "jobs": list(r.jobs), "entity": r.entity, "records": int(len(idx)),
                           "parents": parents}
    return out


_ROUTES: dict[tuple[str, str], Callable[[Simulator, dict[str, str], dict[str, Any]], Any]] = {
    ("GET", "/_sim/health"): _health,
    ("GET", "/_sim/info"): _info,
    ("GET", "/_sim/entities"): _entities,
    ("GET", "/_sim/clock"): _clock,
    ("POST", "/_sim/clock"): _clock_post,
    ("POST", "/_sim/mutate"): _mutate,
    ("GET", "/_sim/faults"): _faults_get,
    ("POST", "/_sim/faults"): _faults_post,
    ("DELETE", "/_sim/faults"): _faults_delete,
    ("GET", "/_sim/stats"): _stats,
    ("DELETE", "/_sim/stats"): _stats_delete,
    ("POST", "/_sim/stats/reset"): _stats_delete,
    ("GET", "/_sim/expected"): _expected,
    ("GET", "/_sim/parents"): _parents,
    ("GET", "/_sim/counts"): _counts,
}
