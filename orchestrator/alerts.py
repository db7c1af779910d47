"""Alerts: email (SMTP) and Slack (incoming webhook) when a job run fails, a transform procedure
fails or an error-severity quality check fails -- once per failure streak, plus one recovery message.

How de-duplication works: every alert *subject* (``job:<id>``, ``transform:<procedure>``,
``quality:<check>``) has a row in ``etl.dw_alert_state`` (``ok`` | ``failing``). An evaluation
reads the current condition of every subject from the run tables and compares, under a row lock:

* ok -> failing: one **failure** message (the streak starts);
* failing -> failing: nothing (the streak's failure count grows);
* failing -> ok: one **recovery** message ("succeeded again after N failures").

The row lock is held while sending, so two processes evaluating at the same moment (a scheduler
and an operator's ``trialsync run``) never both send. A channel that could not be reached is
remembered (``pending_channels``) and retried at the next evaluation -- only that channel, and
only while the condition still holds.

Configuration (environment): ``ALERT_EMAIL`` (comma-separated recipients) + ``SMTP_HOST``,
``SMTP_PORT``, ``SMTP_USER``, ``SMTP_PASSWORD``, ``SMTP_STARTTLS``, ``ALERT_EMAIL_FROM``; and/or
``SLACK_WEBHOOK_URL``. Messages never contain a secret: error texts are scrubbed of every
configured secret, the webhook URL and SMTP password never appear in messages, logs or the
``dw_alerts_sent`` audit table, and delivery errors are reported by class and status only.
"""

from __future__ import annotations

import email.policy
import smtplib
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Protocol

import psycopg

from common.config import Settings, get_settings
from common.logging import get_logger
from common.metrics import ALERTS_SENT
from orchestrator.settings import OrchestratorSettings, get_orchestrator_settings

log = get_logger("alerts")

MAX_ERROR_CHARS = 800


@dataclass(frozen=True)
class Condition:
    """The current state of one alert subject, read from the run tables."""

    key: str
    kind: str          # job | transform | quality
    subject: str       # "job 2 (Studies)"
    failing: bool
    event: str         # id of the observation (run id, transform run id, result id)
    error: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    key: str
    kind: str          # failure | recovery
    title: str
    body: str


class Channel(Protocol):
    name: str

    def send(self, msg: Message) -> None: ...


# -- secrets ---------------------------------------------------------------------------------------

def clean(text: str | None, secrets: list[str]) -> str:
    """Scrub every configured secret (and anything that looks like a URL with credentials)."""
    import re

    from common.logging import scrub

    out = scrub(text or "")
    for s in sorted(secrets, key=len, reverse=True):
        if s:
            out = out.replace(s, "***")
    out = re.sub(r"(\w+://)[^/\s:@]+:[^@\s]+@", r"\1***@", out)
    return out[:MAX_ERROR_CHARS] + ("…" if len(out) > MAX_ERROR_CHARS else "")


# -- channels ----------------------------------------------------------------------------------------

class EmailChannel:
    name = "email"

    def __init__(self, settings: Settings, timeout: float):
        assert settings.smtp_host and settings.alert_email
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self.user = settings.smtp_user
        self.password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        self.starttls = settings.smtp_starttls
        self.sender = settings.alert_email_from
        self.recipients = [a.strip() for a in settings.alert_email.split(",") if a.strip()]
        self.timeout = timeout

    def send(self, msg: Message) -> None:
        # SMTP allows 998-character lines: a subject naming a long check is not folded (folding before
        # its first word left readers a subject starting with a space)
        em = EmailMessage(policy=email.policy.SMTP.clone(max_line_length=998))
        em["Subject"] = msg.title
        em["From"] = self.sender
        em["To"] = ", ".join(self.recipients)
        em["X-TrialSync-Alert"] = f"{msg.kind}; {msg.key}"
        em.set_content(msg.body)
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            if self.starttls:
                smtp.starttls()
            if self.user and self.password:
                smtp.login(self.user, self.password)
            smtp.send_message(em)


class SlackChannel:
    name = "slack"

    def __init__(self, settings: Settings, timeout: float):
        assert settings.slack_webhook_url is not None
        self._url = settings.slack_webhook_url.get_secret_value()
        self.timeout = timeout

    def send(self, msg: Message) -> None:
        import requests

        icon = ":red_circle:" if msg.kind == "failure" else ":large_green_circle:"
        r = requests.post(self._url, json={"text": f"{icon} *{msg.title}*\n{msg.body}"}, timeout=self.timeout)
        if r.status_code >= 300:
            raise DeliveryError(f"Slack webhook answered HTTP {r.status_code}")

    def __repr__(self) -> str:
        return "SlackChannel(url=***)"


class DeliveryError(RuntimeError):
    pass


def configured_channels(settings: Settings | None = None, orch: OrchestratorSettings | None = None) -> list[Channel]:
    s = settings or get_settings()
    o = orch or get_orchestrator_settings()
    out: list[Channel] = []
    if s.alert_email and s.smtp_host:
        out.append(EmailChannel(s, o.alert_timeout_seconds))
    if s.slack_webhook_url is not None and s.slack_webhook_url.get_secret_value():
        out.append(SlackChannel(s, o.alert_timeout_seconds))
    return out


def describe_delivery_error(e: BaseException) -> str:
    """Why a delivery failed, without echoing URLs or credentials (requests puts the URL in messages)."""
    if isinstance(e, DeliveryError):
        return str(e)
    if isinstance(e, smtplib.SMTPResponseException):
        return f"{type(e).__name__}: SMTP {e.smtp_code}"
    return type(e).__name__


# -- conditions ------------------------------------------------------------------------------------

def _exists(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def current_conditions(conn: psycopg.Connection) -> list[Condition]:
    """The latest finished observation of every subject."""
    out: list[Condition] = []
    for job_id, name, run_id, status, error, completed, attempt, trigger in conn.execute(
            """SELECT DISTINCT ON (r.job_id) r.job_id, j.name, r.id, r.run_status, r.error_message, r.completed_at,
                      r.attempt, r.trigger
                 FROM etl.dw_etl_runs r JOIN etl.dw_etl_jobs j ON j.id = r.job_id
                WHERE r.run_status IN ('success', 'partial', 'failed')
                  -- a failed attempt of an orchestration still running may yet be retried
                  AND NOT (r.run_status = 'failed' AND EXISTS (
                        SELECT 1 FROM etl.dw_orchestrations o
                         WHERE o.id = r.orchestration_id AND o.status = 'running'
                           AND o.started_at > now() - interval '24 hours'))
                ORDER BY r.job_id, r.started_at DESC, r.id DESC""").fetchall():
        out.append(Condition(f"job:{job_id}", "job", f"job {job_id} ({name})", status == "failed", str(run_id), error,
                             {"job_id": job_id, "run_id": run_id, "status": status, "at": completed,
                              "attempt": attempt, "trigger": trigger}))
    if _exists(conn, "etl.dw_transform_runs"):
        for proc, tid, status, error, finished in conn.execute(
                """SELECT DISTINCT ON (procedure_name) procedure_name, id, status, error_message, finished_at
                     FROM etl.dw_transform_runs WHERE status IN ('success', 'failed')
                    ORDER BY procedure_name, started_at DESC, id DESC""").fetchall():
            out.append(Condition(f"transform:{proc}", "transform", f"transform {proc}", status == "failed", str(tid),
                                 error, {"procedure": proc, "transform_run_id": tid, "at": finished}))
    if _exists(conn, "etl.v_quality_latest"):
        for check, table, status, failed_rows, checked, error in conn.execute(
                """SELECT check_name, target_table, status, failed_rows, checked_at, error_message
                     FROM etl.v_quality_latest WHERE severity = 'error' AND status IS NOT NULL""").fetchall():
            # 'empty' (nothing to check) neither fails nor recovers a check
            out.append(Condition(f"quality:{check}", "quality", f"quality check {check}", status in ("fail", "error"),
                                 f"{checked.isoformat() if checked else ''}", error,
                                 {"check": check, "table": table, "status": status, "failed_rows": failed_rows,
                                  "at": checked}))
    return out


# -- messages --------------------------------------------------------------------------------------

def _when(t: Any) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(t, datetime) else "-"


def failure_message(c: Condition, prefix: str, secrets: list[str]) -> Message:
    host = socket.gethostname()
    err = clean(c.error, secrets) or "(no error message)"
    f = c.facts
    if c.kind == "job":
        title = f"{prefix} {c.subject} failed"
        body = (f"Run {f['run_id']} of {c.subject} failed at {_when(f.get('at'))} "
                f"(attempt {f.get('attempt')}, trigger {f.get('trigger')}, host {host}).\n"
                f"Error: {err}\n\nNext steps: `trialsync history --job {f['job_id']}`, "
                f"`trialsync retry --run-id {f['run_id']}`.\n"
                "You get one message per failure streak; a recovery message follows when the job succeeds again.")
    elif c.kind == "transform":
        title = f"{prefix} {c.subject} failed"
        body = (f"Transform procedure {f['procedure']} failed at {_when(f.get('at'))} (run {f['transform_run_id']}, "
                f"host {host}).\nError: {err}\n\nNext steps: `trialsync transform --status`; it is retried "
                "automatically, or run `trialsync transform --now`.")
    else:
        title = f"{prefix} {c.subject} failing"
        detail = f"{f.get('failed_rows')} row(s) fail it" if f.get("status") == "fail" else f"the check errored: {err}"
        body = (f"Error-severity quality check {f['check']} on {f.get('table')} failed at {_when(f.get('at'))}: "
                f"{detail}.\n\nNext steps: `trialsync transform --status`; see etl.v_quality_latest.")
    return Message(c.key, "failure", title, body)


def recovery_message(c: Condition, failures: int, since: Any, prefix: str) -> Message:
    what = {"job": "succeeded again", "transform": "succeeded again", "quality": "passes again"}[c.kind]
    extra = f" (run {c.facts['run_id']}, {c.facts.get('status')})" if c.kind == "job" else ""
    return Message(c.key, "recovery", f"{prefix} recovered: {c.subject} {what}",
                   f"{c.subject} {what}{extra} after {failures} failure(s) since {_when(since)}.")


# -- evaluation ------------------------------------------------------------------------------------

@dataclass
class Delivery:
    key: str
    kind: str
    channel: str
    ok: bool
    error: str | None = None


def evaluate(conn: psycopg.Connection, channels: list[Channel], settings: Settings | None = None,
             orch: OrchestratorSettings | None = None, conditions: list[Condition] | None = None) -> list[Delivery]:
    """Compare current conditions with the streak state; send what a transition calls for."""
    s = settings or get_settings()
    o = orch or get_orchestrator_settings()
    secrets = s.secret_values()
    conds = conditions if conditions is not None else current_conditions(conn)
    out: list[Delivery] = []
    for c in conds:
        with conn.transaction():
            # make sure the row exists, then lock it: concurrent evaluators serialize on the lock
            conn.execute(
                """INSERT INTO etl.dw_alert_state (alert_key, kind, subject, state) VALUES (%s, %s, %s, 'ok')
                   ON CONFLICT (alert_key) DO NOTHING""", (c.key, c.kind, c.subject[:255]))
            row = conn.execute(
                """SELECT state, streak_started_at, failures, last_event, alerted_at, pending_kind, pending_channels
                     FROM etl.dw_alert_state WHERE alert_key = %s FOR UPDATE""", (c.key,)).fetchone()
            assert row is not None
            msg: Message | None = None
            targets = [ch.name for ch in channels]
            state, since, failures, last_event, alerted_at, pending_kind, pending = row
            if c.failing and state == "ok":
                conn.execute(
                    """UPDATE etl.dw_alert_state SET state = 'failing', streak_started_at = now(), failures = 1,
                              last_event = %s, last_error = %s, pending_kind = NULL, pending_channels = '{}',
                              alerted_at = NULL, updated_at = now() WHERE alert_key = %s""",
                    (c.event[:100], clean(c.error, secrets), c.key))
                msg = failure_message(c, o.alert_subject_prefix, secrets)
            elif c.failing:
                if c.event != last_event:
                    conn.execute(
                        """UPDATE etl.dw_alert_state SET failures = failures + 1, last_event = %s, last_error = %s,
                                  updated_at = now() WHERE alert_key = %s""",
                        (c.event[:100], clean(c.error, secrets), c.key))
                if pending_kind == "failure" and pending:
                    msg = failure_message(c, o.alert_subject_prefix, secrets)
                    targets = [t for t in targets if t in pending]
            elif state == "failing":
                conn.execute(
                    """UPDATE etl.dw_alert_state SET state = 'ok', recovered_at = now(), last_event = %s,
                              last_error = NULL, pending_kind = NULL, pending_channels = '{}', updated_at = now()
                       WHERE alert_key = %s""", (c.event[:100], c.key))
                if alerted_at is not None:
                    msg = recovery_message(c, int(failures), since, o.alert_subject_prefix)
                else:
                    log.info("alert_streak_ended_unsent", key=c.key)
            else:
                if c.event != last_event:
                    conn.execute("UPDATE etl.dw_alert_state SET last_event = %s, updated_at = now() "
                                 "WHERE alert_key = %s", (c.event[:100], c.key))
                if pending_kind == "recovery" and pending:
                    msg = recovery_message(c, int(failures), since, o.alert_subject_prefix)
                    targets = [t for t in targets if t in pending]
            if msg is None:
                continue
            sent, failed = [], []
            for ch in channels:
                if ch.name not in targets:
                    continue
                try:
                    ch.send(msg)
                    sent.append(ch.name)
                    ALERTS_SENT.labels(ch.name, msg.kind).inc()
                    out.append(Delivery(c.key, msg.kind, ch.name, True))
                except Exception as e:  # noqa: BLE001 - remembered and retried at the next evaluation
                    why = describe_delivery_error(e)
                    failed.append(ch.name)
                    out.append(Delivery(c.key, msg.kind, ch.name, False, why))
                    log.warning("alert_delivery_failed", key=c.key, kind=msg.kind, channel=ch.name, error=why)
                conn.execute(
                    """INSERT INTO etl.dw_alerts_sent (alert_key, kind, channel, ok, title, error)
                       VALUES (%s, %s, %s, %s, %s, %s)""",
                    (c.key, msg.kind, ch.name, ch.name in sent, msg.title, out[-1].error))
            conn.execute(
                """UPDATE etl.dw_alert_state SET pending_kind = %s, pending_channels = %s,
                          alerted_at = CASE WHEN %s AND %s = 'failure' THEN now() ELSE alerted_at END
                   WHERE alert_key = %s""",
                (msg.kind if failed else None, failed, bool(sent) or not channels, msg.kind, c.key))
            if not channels:
                log.warning("alert_no_channel", key=c.key, kind=msg.kind, title=msg.title,
                            hint="set ALERT_EMAIL + SMTP_HOST and/or SLACK_WEBHOOK_URL")
            else:
                log.info("alert_sent", key=c.key, kind=msg.kind, channels=sent, failed=failed)
    return out


def evaluate_and_notify(settings: Settings | None = None) -> list[Delivery]:
    """One evaluation with the configured channels (the scheduler and ``run`` call this)."""
    from common.db import connect
    from orchestrator.store import mark_stale_orchestrations

    s = settings or get_settings()
    with connect(s, autocommit=True, application_name="trialsync-alerts") as conn:
        mark_stale_orchestrations(conn)
        return evaluate(conn, configured_channels(s), s)


def send_test(settings: Settings | None = None) -> list[Delivery]:
    """``trialsync alerts test``: one message to every configured channel, no state involved."""
    s = settings or get_settings()
    o = get_orchestrator_settings()
    msg = Message("test", "recovery", f"{o.alert_subject_prefix} test alert",
                  f"This is a test message from TrialSync on {socket.gethostname()}. Alerts reach you here.")
    out = []
    for ch in configured_channels(s, o):
        try:
            ch.send(msg)
            out.append(Delivery("test", "test", ch.name, True))
        except Exception as e:  # noqa: BLE001
            out.append(Delivery("test", "test", ch.name, False, describe_delivery_error(e)))
    return out
