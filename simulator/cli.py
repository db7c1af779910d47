"""Commands of the simulator package, registered on the `trialsync` app by common/cli.py.

``trialsync simulator serve`` runs the Clinical Conductor stand-in; the other commands are thin
clients of its admin API (``/_sim``), for demos and manual testing.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Annotated

import typer

simulator_app = typer.Typer(no_args_is_help=True, help="Clinical Conductor simulator: serve it, change its data, inject faults.")
faults_app = typer.Typer(no_args_is_help=True, help="Show, set or clear injected faults of a running simulator.")
simulator_app.add_typer(faults_app, name="faults")

AdminUrl = Annotated[str, typer.Option("--url", envvar="SIM_ADMIN_URL", help="admin URL of a running simulator")]
DEFAULT_ADMIN = "http://127.0.0.1:8765/_sim"


def register(app: typer.Typer) -> None:
    """Add this package's commands to the top-level app."""
    app.add_typer(simulator_app, name="simulator")


@simulator_app.command("serve")
def serve(
    scale: Annotated[float, typer.Option(help="1.0 = production volumes (2.3 M patient visits); 0.01 demo; 0.002 tests")] = 0.01,
    seed: Annotated[int, typer.Option(help="same seed + scale + admin calls = same bytes")] = 42,
    host: Annotated[str, typer.Option(help="bind address (the admin API only answers loopback clients)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="0 = pick a free port (see --ready-file)")] = 8765,
    latency_ms: Annotated[float, typer.Option("--latency-ms", help="added to every API request")] = 0.0,
    faults: Annotated[str | None, typer.Option(help="fault SPEC, e.g. '429@/api/v1/patients/*,p=0.1;reset,count=2' (see simulator/README.md)")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SIM_API_KEY", show_envvar=True,
                                                help="the key clients must send; a random one is made and printed if unset")] = None,
    key_header: Annotated[str, typer.Option("--key-header", help="API key header name (X-ApiKey and CCAPIKey always work)")] = "X-ApiKey",
    rate_limit: Annotated[float | None, typer.Option("--rate-limit", help="requests/s per API key (token bucket); 429 + Retry-After beyond")] = None,
    odata_shape: Annotated[str, typer.Option("--odata-shape", help="spec (PageResult/arrays as the spec says) | odata (@odata.count/value) | mixed")] = "spec",
    workers: Annotated[int, typer.Option(help="uvicorn worker processes; admin changes need 1")] = 1,
    ready_file: Annotated[Path | None, typer.Option("--ready-file", help="write {base_url, port, pid} here once serving")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "warning",
) -> None:
    """Serve the simulated Clinical Conductor API at http://HOST:PORT/CCSWEB (admin at /_sim)."""
    from common.cli import UserError
    from common.logging import add_secret
    from simulator.app import SHAPES, SimConfig
    from simulator.faults import FaultSpecError, parse_faults
    from simulator.server import serve as run

    if odata_shape not in SHAPES:
        raise UserError(f"--odata-shape {odata_shape!r} is not one of {', '.join(SHAPES)}", code=2)
    if scale <= 0:
        raise UserError(f"--scale must be > 0, got {scale}", code=2)
    if workers < 1:
        raise UserError("--workers must be >= 1", code=2)
    if rate_limit is not None and rate_limit <= 0:
        raise UserError("--rate-limit must be > 0 requests/s", code=2)
    try:
        parse_faults(faults)
    except FaultSpecError as e:
        raise UserError(f"--faults: {e}", code=2) from None
    if not api_key:
        api_key = secrets.token_urlsafe(18)
        print(f"no --api-key/SIM_API_KEY given: using the throwaway key {api_key}", file=sys.stderr, flush=True)
    else:
        add_secret(api_key)
    cfg = SimConfig(scale=scale, seed=seed, host=host, port=port, latency_ms=latency_ms, faults=faults,
                    api_key=api_key, key_header=key_header, rate_limit=rate_limit, odata_shape=odata_shape,
                    workers=workers)
    try:
        run(cfg, ready_file=ready_file, log_level=log_level)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror} (use another --port, or 0 for a free one)") from None


def _admin(url: str, method: str, path: str, body: dict | None = None, params: dict | None = None):
    import requests

    from common.cli import UserError

    try:
        r = requests.request(method, url.rstrip("/") + path, json=body, params=params, timeout=600)
    except requests.ConnectionError:
        raise UserError(f"no simulator answers at {url}: start one with `trialsync simulator serve`", code=3) from None
    if r.status_code >= 400:
        try:
            msg = r.json().get("message", r.text)
        except ValueError:
            msg = r.text
        raise UserError(f"simulator said {r.status_code}: {msg}")
    return r


def _print(data: object) -> None:
    print(json.dumps(data, indent=2))


@simulator_app.command("mutate")
def mutate(
    model: Annotated[str, typer.Option(help="uniform: change --entity records anywhere (fractions below); realistic: "
                                            "--days of site activity on active studies (simulator/activity.py)")] = "uniform",
    days: Annotated[int | None, typer.Option(help="realistic model: days of activity (default 1)")] = None,
    fraction: Annotated[float | None, typer.Option(help="realistic model: simulate days until this share of all live "
                                                        "records changed")] = None,
    entity: Annotated[str | None, typer.Option(help="entity name (see `trialsync simulator info`)")] = None,
    endpoint: Annotated[str | None, typer.Option(help="or an endpoint template, e.g. /api/v1/studies/{studyId}/subjects/odata")] = None,
    modify: Annotated[float, typer.Option(help="fraction of live records to modify (bumps the timestamp)")] = 0.0,
    insert: Annotated[float, typer.Option(help="fraction of live records to add")] = 0.0,
    delete: Annotated[float, typer.Option(help="fraction of live records to delete")] = 0.0,
    modify_ids: Annotated[str | None, typer.Option("--modify-ids", help="comma-separated ids")] = None,
    delete_ids: Annotated[str | None, typer.Option("--delete-ids", help="comma-separated ids")] = None,
    touch_parents: Annotated[bool, typer.Option(help="also stamp the changed records' parents (and theirs) with "
                                                     "the change's time, as if CC cascaded modifiedDate")] = False,
    url: AdminUrl = DEFAULT_ADMIN,
) -> None:
    """Modify / insert / delete records of a running simulator (deterministic per seed and call order)."""
    if model == "realistic":
        res = _admin(url, "POST", "/mutate", {k: v for k, v in {"model": "realistic", "days": days, "fraction": fraction,
                                                                "touch_parents": touch_parents or None}.items()
                                              if v is not None}).json()
        print(json.dumps({k: res[k] for k in ("model", "seq", "clock", "days", "changed", "share", "counts")}, indent=2))
        return
    body: dict = {"entity": entity, "endpoint": endpoint, "modify": modify, "insert": insert, "delete": delete,
                  "touch_parents": touch_parents or None}
    if modify_ids:
        body["modify_ids"] = [int(x) for x in modify_ids.split(",")]
    if delete_ids:
        body["delete_ids"] = [int(x) for x in delete_ids.split(",")]
    res = _admin(url, "POST", "/mutate", {k: v for k, v in body.items() if v is not None}).json()
    print(json.dumps({k: res[k] for k in ("entity", "seq", "clock", "counts")}, indent=2))


@simulator_app.command("clock")
def clock(
    advance: Annotated[float | None, typer.Option(help="seconds to move the simulated clock forward")] = None,
    url: AdminUrl = DEFAULT_ADMIN,
) -> None:
    """Show (or advance) the simulated clock."""
    if advance is None:
        _print(_admin(url, "GET", "/clock").json())
    else:
        _print(_admin(url, "POST", "/clock", {"advance_seconds": advance}).json())


@simulator_app.command("stats")
def stats(reset: Annotated[bool, typer.Option(help="reset the counters after printing")] = False,
          url: AdminUrl = DEFAULT_ADMIN) -> None:
    """Requests per endpoint template and status, records served, faults injected."""
    _print(_admin(url, "GET", "/stats").json())
    if reset:
        _admin(url, "DELETE", "/stats")


@simulator_app.command("info")
def info(url: AdminUrl = DEFAULT_ADMIN) -> None:
    """Seed, scale, clock, entities and routes of a running simulator."""
    _print(_admin(url, "GET", "/info").json())


@simulator_app.command("expected")
def expected(
    endpoint: Annotated[str | None, typer.Option(help="endpoint template")] = None,
    job: Annotated[int | None, typer.Option(help="or a job id")] = None,
    url: AdminUrl = DEFAULT_ADMIN,
) -> None:
    """Stream the ground truth (NDJSON {params, record}) of an endpoint template to stdout."""
    params = {"job": job} if job is not None else {"endpoint": endpoint}
    r = _admin(url, "GET", "/expected", params=params)
    for chunk in r.iter_content(1 << 16):
        sys.stdout.buffer.write(chunk)


@faults_app.command("show")
def faults_show(url: AdminUrl = DEFAULT_ADMIN) -> None:
    """Active fault rules and how often each kind was injected."""
    _print(_admin(url, "GET", "/faults").json())


@faults_app.command("set")
def faults_set(spec: Annotated[str, typer.Argument(help="fault SPEC (see simulator/README.md)")],
               append: Annotated[bool, typer.Option(help="add to the active rules instead of replacing them")] = False,
               url: AdminUrl = DEFAULT_ADMIN) -> None:
    """Replace (or extend) the active fault rules."""
    _print(_admin(url, "POST", "/faults", {"spec": spec, "append": append}).json())


@faults_app.command("clear")
def faults_clear(url: AdminUrl = DEFAULT_ADMIN) -> None:
    """Remove every fault rule."""
    _print(_admin(url, "DELETE", "/faults").json())


@simulator_app.command("extract-spec")
def extract_spec(
    source: Annotated[Path, typer.Option("--from", help="the full CC Swagger file (cc_openapi.json)")],
) -> None:
    """Refresh simulator/data/cc_spec.json: the subset of the CC spec the simulator serves."""
    from schemas.jobs import JobCatalog
    from simulator.spec import ROUTE_TABLE, SPEC_FILE, extract_subset

    full = json.loads(source.read_text(encoding="utf-8"))
    templates = list(ROUTE_TABLE) + [j.endpoint for j in JobCatalog.load()]
    sub = extract_subset(full, templates)
    SPEC_FILE.write_text(json.dumps(sub, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {SPEC_FILE} ({len(sub['paths'])} paths, {len(sub['definitions'])} definitions)")




@simulator_app.command("reconcile")
def reconcile_cmd(
    job: Annotated[list[int] | None, typer.Option("--job", "-j", help="job id (repeatable; default: every runnable job)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the full report as JSON")] = False,
    problems_only: Annotated[bool, typer.Option("--problems-only", help="list only tables that are not exact")] = False,
    url: AdminUrl = DEFAULT_ADMIN,
) -> None:
    """Compare every staging table with the simulator's ground truth (ids and content).

    Exit code 0 when exact (no missing, duplicated, stale or extra rows), 1 otherwise.
    """
    from common.catalog import load_catalog
    from common.cli import UserError
    from common.config import get_settings
    from common.db import connect
    from schemas.jobs import CatalogError
    from simulator.reconcile import format_table, reconcile

    _admin(url, "GET", "/health")  # a clear error when no simulator answers
    s = get_settings()
    catalog = load_catalog(s)
    ids = job or [j.id for j in catalog.runnable]
    with connect(s, autocommit=True, application_name="trialsync-reconcile") as conn:
        try:
            rec = reconcile(conn, url, catalog, ids, instance=s.cc_instance_id)
        except CatalogError as e:
            raise UserError(str(e), code=2) from None
    if as_json:
        _print(rec.as_dict())
    else:
        print(format_table(rec, only_problems=problems_only))
    if not rec.exact:
        raise typer.Exit(1)
