"""The configuration reference in ``docs/configuration.md``, generated from the Settings model.

Why generated: a hand-written list of settings goes stale the day someone adds one. The table
between the markers in docs/configuration.md is this module's output; ``tests/unit/
test_deploy_docs.py`` fails when they differ or when a setting has no explanation here, naming
the setting. Regenerate with ``.venv/bin/python -m orchestrator.config_reference``.
"""

from __future__ import annotations

import re
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from common.config import SECRET_FIELDS, Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED SETTINGS (python -m orchestrator.config_reference) -->"
END = "<!-- END GENERATED SETTINGS -->"

#: what each setting does and when to change it (the Field description, where present, is added)
EXPLAIN: dict[str, str] = {
    "database_url": "Full PostgreSQL URL. Wins over the DATABASE_* parts. Unset with DATABASE_HOST unset = the "
                    "embedded server of `trialsync stack up`.",
    "database_host": "PostgreSQL host; setting it (or DATABASE_URL) switches from the embedded server to this one.",
    "database_port": "PostgreSQL port.",
    "database_name": "Database name.",
    "database_user": "Login of this process: the services' is `trialsync_writer` (member of `trialsync_etl`), "
                     "the history API's `trialsync_reader` (member of `trialsync_analytics`); never the superuser "
                     "(only `db migrate` needs it: DATABASE_ADMIN_URL).",
    "database_password": "Password of DATABASE_USER. compose.yaml sets it per service (writer or reader password).",
    "database_admin_url": "The owner/superuser login `trialsync db migrate` uses (the only command that needs it); "
                          "unset = DATABASE_URL / DATABASE_* (then that login must own the schema and have "
                          "CREATEROLE).",
    "database_writer_password": "With it `db migrate` creates/updates the login `trialsync_writer` (IN ROLE "
                                "trialsync_etl). Services then log in as it (DATABASE_USER/DATABASE_PASSWORD).",
    "database_reader_password": "With it `db migrate` creates/updates the read-only login `trialsync_reader` (IN ROLE "
                                "trialsync_analytics), and the history API and the quality checks' SQL connect as "
                                "it (on DATABASE_HOST/PORT/NAME). Unset (external database): the API uses its own "
                                "login and checks run read-only on the transformer's.",
    "database_reader_url": "Full URL of the read-only login, where it is not `trialsync_reader` on DATABASE_HOST.",
    "database_pool_size": "Connections per process pool. Size the server's max_connections for "
                          "(processes x pool size) + headroom.",
    "database_statement_timeout_ms": "Statement timeout for TrialSync sessions; 0 = none.",
    "cc_api_base_url": "Clinical Conductor base URL including the path prefix (…/CCSWEB). `trialsync doctor` "
                       "answers 404 when the prefix is wrong.",
    "cc_api_key": "API key, sent in the CC_API_KEY_HEADER header. From the environment or a secret store; never "
                  "logged, never in metric labels.",
    "cc_api_key_header": "Header carrying the key: the seed docs say `X-ApiKey`, the CC spec `CCAPIKey`.",
    "cc_instance_id": "Prefix of every source_id so several CC instances can share one warehouse. Never change it "
                      "after the first load (every row's key would change).",
    "cc_rate_limit_rps": "Requests per second for all workers of one instance together; lower it when the "
                         "dashboard shows steady 429s.",
    "cc_page_size": "OData `$top` per request (hard maximum 1000).",
    "cc_incremental_overlap_seconds": "Incremental runs ask for `modifiedDate gt (watermark - overlap)` so clock "
                                      "skew and late commits on the CC side lose nothing; duplicates are harmless.",
    "etl_batch_size": "Records per processing batch in the extractor (seed 001).",
    "etl_max_retries": "Automatic retries of a failed or partial run (exponential backoff); also HTTP retries per "
                       "request.",
    "etl_retry_delay_seconds": "Base delay of the exponential backoff (delay x 2^attempt).",
    "etl_parallel_jobs": "Jobs run concurrently by `trialsync run --all` and the scheduler.",
    "etl_timeout_seconds": "Default job timeout; per job `timeout_seconds` in config/jobs.yaml wins. A run over "
                           "its timeout is stopped and marked failed.",
    "etl_request_timeout_seconds": "Timeout of one HTTP request to Clinical Conductor.",
    "etl_fanout_incremental": "Incremental runs of parameterized (fan-out) jobs: `changed` (default) asks only the "
                              "parents whose own timestamp moved since the job's last complete run, plus a "
                              "rotating sweep slice that also checks the assumption behind it (Clinical Conductor "
                              "moves a parent's timestamp when a child changes): a job's first incremental night "
                              "asks every parent to check it (a change under an unmarked parent -- newer than the "
                              "parent's watermark, or for jobs without one a different content hash than "
                              "staging's -- is counted), and a job that saw nothing unannounced is trusted from "
                              "then on; a change the sweep finds under an unmarked parent is counted, alerted on, "
                              "and sends the job back to asking every parent until a complete run finds nothing "
                              "unannounced. `all` asks every parent every night (one call each). Per job: "
                              "`fanout_incremental` in config/jobs.yaml (also `assumed`: trusted without the "
                              "verification night); docs/extraction.md.",
    "etl_fanout_sweep_runs": "With `changed`: the parents are split into N hash slices and each run also asks "
                             "one slice, so a child change the parent did not show is picked up within N runs.",
    "etl_stall_seconds": "A run with no progress for this long (no record read or acknowledged, no API answer) is "
                         "stalled -- e.g. a broker that restarted and lost the producer's state -- and fails with "
                         "the reason instead of waiting for its timeout; the orchestrator retries it.",
    "etl_call_budget": "API calls one orchestration (a night) may make; 0 = derive it from ETL_NIGHT_WINDOW_HOURS x "
                       "CC_RATE_LIMIT_RPS, or no budget. Fan-out jobs spend it on changed parents first, then the "
                       "sweep and unfinished first passes; the rest waits for the next night "
                       "(`trialsync run --all --dry-run` shows the plan).",
    "etl_night_window_hours": "Length of the nightly window; with CC_RATE_LIMIT_RPS it sets the call budget "
                              "(window x rate). 0 = no budget.",
    "etl_jobs_file": "Operator overrides of the job catalog (schedules, priorities, dependencies, timeouts, "
                     "CSV sources).",
    "kafka_bootstrap_servers": "Broker address list. Unset = the embedded broker of `trialsync stack up`.",
    "kafka_topic_prefix": "Prefix of every topic (`<prefix>.bronze.<table>`, `<prefix>.control.runs`, …). "
                          "Separate environments sharing a broker need different prefixes.",
    "kafka_partitions": "Partitions of each new bronze topic: the upper bound of useful loader processes per "
                        "table. Existing topics keep theirs.",
    "kafka_replication_factor": "Replication factor of new topics (3 on a production cluster, 1 on dev Redpanda).",
    "kafka_session_timeout_ms": "Consumer-group session timeout: how fast a dead loader's partitions move to "
                                "another (and how long a group join takes on the embedded broker).",
    "kafka_connect_timeout_seconds": "How long a client waits for a broker to answer (TCP connect and the first "
                                     "metadata request) before the command says it is not reachable; clients "
                                     "keep retrying quietly (librdkafka's own lines only at LOG_LEVEL=DEBUG).",
    "loader_batch_size": "Loader micro-batch: flush after this many records…",
    "loader_flush_ms": "…or after this many milliseconds, whichever comes first.",
    "loader_idle_probe_ms": "A loader that got no record for 5 s stops fetching: a run announced on the control topic "
                            "wakes it (within ~0.5 s), and it looks for other records (replays, other producers) this "
                            "often. An idle installation then costs the embedded broker ~1 % of a core instead of "
                            "~17 %. `0` = never stop fetching (Redpanda/Kafka answer a waiting fetch as soon as "
                            "records arrive, so there the cost of fetching is small).",
    "trialsync_state_dir": "Where the embedded stack keeps data, logs and ports (also STATE_DIR).",
    "trialsync_pg_port": "Fixed port for the embedded PostgreSQL; unset = a free one, remembered.",
    "trialsync_kafka_port": "Fixed port for the embedded broker; unset = a free one, remembered.",
    "kafka_topic_retention_hours": "`retention.ms` TrialSync sets on the bronze, dead-letter and control topics it "
                                   "creates (Redpanda/Kafka enforce it; the compacted watermark topic keeps the latest "
                                   "value per key instead). Keep it longer than the interval between full runs, so "
                                   "`replay --truncate` finds every key. Existing topics keep theirs "
                                   "(`rpk topic alter-config`).",
    "trialsync_broker_storage": "`durable` keeps topics, records and committed offsets on disk under the state "
                                "directory (tansu on a local S3 server, s3rver from npm) so they survive `stack down`, "
                                "a reboot or a killed broker; `memory` is faster (the test suite uses it) and loses "
                                "every topic when the broker stops. Takes effect at the next `stack up` of a stopped "
                                "broker. See docs/deployment.md.",
    "trialsync_broker_retention_hours": "Durable embedded broker: bronze and dead-letter records older than this are "
                                        "deleted (never records the loader group has not loaded yet). Keep it longer "
                                        "than the interval between full runs so `replay --truncate` has every key.",
    "trialsync_broker_retention_mb": "Durable embedded broker: per-topic size bound; the oldest loaded batches go "
                                     "first. Size it above one full run of the largest table.",
    "trialsync_broker_retention_interval_seconds": "How often the embedded stack's retention keeper sweeps the "
                                                   "durable broker's storage.",
    "log_level": "DEBUG, INFO, WARNING, ERROR or CRITICAL.",
    "log_format": "`json` (one event per line, for services), `console` (readable) or `auto` (console on a "
                  "terminal, else json).",
    "log_file": "Also write logs to this file.",
    "enable_metrics": "Serve /metrics, /healthz and /readyz from every process.",
    "metrics_port": "Port of /metrics, /healthz, /readyz (9108 in the image). A one-shot command (`extract`) "
                    "whose port is taken serves on a free port instead and logs it (`metrics_port_in_use`).",
    "metrics_host": "Interface /metrics, /healthz and /readyz listen on. Default 127.0.0.1 (this host only); "
                    "set 0.0.0.0 where Prometheus scrapes from elsewhere (compose does, inside its network).",
    "alert_email": "Recipient(s) of failure alerts (comma-separated); unset = no email.",
    "alert_email_from": "Sender address of alert emails.",
    "smtp_host": "SMTP relay for alert emails.",
    "smtp_port": "SMTP port.",
    "smtp_user": "SMTP login (optional).",
    "smtp_password": "SMTP password (optional).",
    "smtp_starttls": "Use STARTTLS with the SMTP relay.",
    "slack_webhook_url": "Slack incoming-webhook URL for alerts; unset = no Slack.",
    "api_token": "Bearer token required by the history API (`trialsync api`). Unset: the API only starts on a "
                 "loopback interface, or with `--no-auth`. Compared in constant time, never logged.",
}

#: settings models of other packages, documented when the package is installed: (module, class, title)
EXTRA_MODELS = [("consumers.transform_settings", "TransformSettings", "Transform consumer (TRANSFORM_*)"),
                ("orchestrator.settings", "OrchestratorSettings", "Orchestration, scheduler and alerts")]

#: explanations for the extra models and for shared settings added by other packages, by env var
EXPLAIN_ENV: dict[str, str] = {
    "ETL_HTTP_ENGINE": "Extraction HTTP engine: `async` (uvloop), `threads` (requests) or `auto` (async unless an "
                       "HTTP(S) proxy is configured).",
    "TRANSFORM_GROUP_ID": "Consumer group of the transform consumer on the control topic.",
    "TRANSFORM_COALESCE_SECONDS": "After the first loaded run, wait this long for more so several tables "
                                  "finishing together trigger one batch.",
    "TRANSFORM_POLL_INTERVAL_SECONDS": "How often the consumer polls, re-checks whether runs are loaded and looks "
                                       "for due retries.",
    "TRANSFORM_LOAD_WAIT_TIMEOUT_SECONDS": "Give up waiting for the loader after this long and transform what is "
                                           "there (logged).",
    "TRANSFORM_STATEMENT_TIMEOUT_SECONDS": "statement_timeout of each procedure's transaction.",
    "TRANSFORM_RETRY_BASE_SECONDS": "Failed procedures are retried after base x 2^(attempt-1) seconds…",
    "TRANSFORM_RETRY_MAX_SECONDS": "…at most this long…",
    "TRANSFORM_MAX_ATTEMPTS": "…up to this many attempts.",
    "TRANSFORM_QUALITY_ENABLED": "Run the data-quality checks after each batch.",
    "TRANSFORM_QUALITY_TIMEOUT_SECONDS": "Statement timeout of each quality check.",
    "TRANSFORM_WATERMARK_MARGIN_SECONDS": "Safety margin below the oldest open transaction for the incremental "
                                          "horizon.",
    "TRANSFORM_WORK_MEM": "work_mem of each procedure's transaction (full builds hash millions of rows).",
    "TRANSFORM_HISTORY_RETENTION_DAYS": "Transform runs and quality results older than this are pruned hourly; "
                                        "the latest per procedure and per check always stay.",
}

GROUPS = [("database_", "Database"), ("cc_", "Clinical Conductor API"), ("etl_", "ETL engine"),
          ("kafka_", "Broker"), ("loader_", "Loader"), ("trialsync_", "Embedded stack"),
          ("log_", "Logging and metrics"), ("enable_metrics", "Logging and metrics"),
          ("metrics_", "Logging and metrics"), ("alert_", "Alerting"), ("smtp_", "Alerting"),
          ("slack_", "Alerting"), ("api_", "History API")]


def env_names(name: str, field: FieldInfo, prefix: str = "") -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(c) for c in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [(prefix + name).upper()]


def models() -> list[tuple[type[BaseSettings], str | None]]:
    """(settings model, group title or None = group by prefix): the shared Settings and those of
    installed packages."""
    import importlib

    out: list[tuple[type[BaseSettings], str | None]] = [(Settings, None)]
    for mod, cls, title in EXTRA_MODELS:
        try:
            out.append((getattr(importlib.import_module(mod), cls), title))
        except (ImportError, AttributeError):
            continue
    return out


def _explanation(name: str, field: FieldInfo, env: str) -> str | None:
    return EXPLAIN.get(name) or EXPLAIN_ENV.get(env) or field.description


def _type(field: FieldInfo) -> str:
    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(ann))
    base = args[0] if args and typing.get_origin(ann) is not typing.Literal else ann
    if typing.get_origin(base) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(base))
    names: dict[object, str] = {SecretStr: "text", Path: "path", int: "integer", float: "number", bool: "boolean",
                                str: "text"}
    known = names.get(base)
    return known if known is not None else str(getattr(base, "__name__", base))


def _constraints(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
        pattern = getattr(m, "pattern", None)
        if pattern:
            out.append(f"`{pattern}`")
    return ", ".join(out)


def _default(name: str, field: FieldInfo) -> str:
    d: Any = field.default
    if d is None:
        return "unset"
    if name in SECRET_FIELDS:
        return "unset"
    if isinstance(d, bool):
        return "`true`" if d else "`false`"
    return f"`{d}`"


def _group(name: str) -> str:
    for prefix, title in GROUPS:
        if name.startswith(prefix):
            return title
    return "Other"


def missing_explanations() -> list[str]:
    out = []
    for model, _ in models():
        prefix = model.model_config.get("env_prefix", "")
        for name, field in model.model_fields.items():
            env = env_names(name, field, prefix)[0]
            if not _explanation(name, field, env):
                out.append(env)
    return out


def render() -> str:
    groups: dict[str, list[str]] = {}
    for model, title in models():
        prefix = model.model_config.get("env_prefix", "")
        for name, field in model.model_fields.items():
            envs = env_names(name, field, prefix)
            env = " / ".join(f"`{e}`" for e in envs)
            text = _explanation(name, field, envs[0]) or "(undocumented)"
            if field.description and field.description not in text and text != field.description \
                    and name in EXPLAIN:
                text += f" ({field.description})"
            secret = " **secret**" if model is Settings and name in SECRET_FIELDS else ""
            row = f"| {env} | {_type(field)}{secret} | {_default(name, field)} | {_constraints(field) or '-'} | " \
                  f"{text.replace('|', '\\|')} |"
            groups.setdefault(title or _group(name), []).append(row)
    out = [BEGIN, ""]
    for title, rows in groups.items():
        out += [f"### {title}", "", "| variable | type | default | allowed | what it does |",
                "|---|---|---|---|---|", *rows, ""]
    out.append(END)
    return "\n".join(out)


def update_doc(path: Path = DOC) -> bool:
    """Rewrite the generated section of the doc; return whether it changed."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: markers {BEGIN!r} … {END!r} not found")
    new = pattern.sub(lambda _: render(), text)
    if new != text:
        path.write_text(new, encoding="utf-8")
        return True
    return False


if __name__ == "__main__":
    missing = missing_explanations()
    if missing:
        print("add an explanation to orchestrator/config_reference.py EXPLAIN for: " + ", ".join(missing),
              file=sys.stderr)
    print("updated" if update_doc() else "up to date", DOC, file=sys.stderr)
