"""Database logins of least privilege: who connects as whom, and how ``db migrate`` sets them up.

Migration 0002 defines two NOLOGIN group roles, ``trialsync_etl`` (writes the warehouse) and
``trialsync_analytics`` (reads it). Processes log in as members of them, never as the owner:

* ``trialsync_writer`` (IN ROLE trialsync_etl, trialsync_analytics) -- extract, load, transform,
  scheduler, status;
* ``trialsync_reader`` (IN ROLE trialsync_analytics) -- the history API, the quality checks'
  SQL, analysts;
* the superuser / database owner only runs ``db migrate``.

``db migrate`` creates or updates the two logins when it knows their passwords (the embedded
stack generates them; elsewhere DATABASE_WRITER_PASSWORD / DATABASE_READER_PASSWORD). Passwords
reach the server only as SCRAM-SHA-256 verifiers, so neither the statement nor a server log holds
a usable password.

Privilege errors become one line naming the missing privilege (:func:`describe_privilege_error`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

import psycopg
from psycopg import sql

from common.config import READER_LOGIN, WRITER_LOGIN

ETL_ROLE = "trialsync_etl"
ANALYTICS_ROLE = "trialsync_analytics"
#: each login and the group roles it joins
MEMBERSHIP = {WRITER_LOGIN: (ETL_ROLE, ANALYTICS_ROLE), READER_LOGIN: (ANALYTICS_ROLE,)}
SCRAM_ITERATIONS = 4096


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """PostgreSQL's stored form of a SCRAM-SHA-256 password (RFC 5802/7677), computed here so the
    password itself never travels in a statement. ASCII passwords need no SASLprep."""
    salt = salt or os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


def _password_literal(password: str) -> sql.Composable:
    if password.isascii():
        return sql.Literal(scram_verifier(password))
    return sql.Literal(password)  # the server applies SASLprep itself


def set_password(conn: psycopg.Connection, role: str, password: str) -> None:
    conn.execute(sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(sql.Identifier(role),
                                                                         _password_literal(password)))


def provision_logins(conn: psycopg.Connection, passwords: dict[str, str], update: bool = True) -> list[str]:
    """Create each login in ``passwords`` (or, with ``update``, set the password of an existing one)
    and make it a member of those of its group roles that exist; return the logins created.

    ``db migrate`` runs it after the migrations (the group roles exist then); the embedded stack
    at start (``update=False``), so its logins can connect -- with no rights -- before the first
    migrate."""
    created = []
    for login, password in passwords.items():
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (login,)).fetchone()
        if not exists:
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(login), _password_literal(password)))
                created.append(login)
            except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                pass  # a concurrent migrate (roles are cluster-wide) made it first
        if login not in created and update:
            set_password(conn, login, password)
        groups = [g for (g,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                             (list(MEMBERSHIP[login]),))]
        for g in sorted(groups):
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(g), sql.Identifier(login)))
    return created


_DENIED = [
    (re.compile(r"permission denied for database (\S+)"),
     "lacks CREATE on database {0} (migrations create the schemas etl, bronze, silver, gold)"),
    (re.compile(r"permission denied for schema (\S+)"),
     "lacks USAGE/CREATE on schema {0}"),
    (re.compile(r"permission denied to create role"),
     "lacks CREATEROLE (migrations create the roles trialsync_etl, trialsync_analytics and the logins "
     "trialsync_writer, trialsync_reader)"),
    (re.compile(r"permission denied to grant role \"?([^\"\s]+)"),
     "lacks ADMIN OPTION on role {0} (needed to add the logins to it)"),
    (re.compile(r"permission denied to alter role"),
     "lacks CREATEROLE (needed to set the logins' passwords)"),
    (re.compile(r"must be owner of (\w+ \S+)"),
     "is not the owner of {0} (only its owner or a superuser may change it)"),
    (re.compile(r"permission denied for (?:table|relation|sequence|view|materialized view) (\S+)"),
     "lacks a privilege on {0}"),
    (re.compile(r"permission denied for (?:function|procedure) (\S+)"),
     "lacks EXECUTE on {0}"),
    (re.compile(r"must be superuser"), "is not a superuser (required: {msg})"),
]


def describe_privilege_error(e: psycopg.Error, user: str | None, doing: str) -> str | None:
    """One line naming the privilege ``user`` lacks for ``doing``; None when ``e`` is no privilege error."""
    sqlstate = getattr(e, "sqlstate", None)
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if sqlstate != "42501" and not isinstance(e, psycopg.errors.InsufficientPrivilege):
        return None
    who = f"login {user!r}" if user else "the database login"
    for pattern, text in _DENIED:
        m = pattern.search(msg)
        if m:
            what = text.format(*m.groups(), msg=msg)
            break
    else:
        what = f"lacks a privilege ({msg})"
    return (f"{doing}: {who} {what}: run it as the database owner or a superuser (set DATABASE_ADMIN_URL "
            "for `trialsync db migrate`), or grant that privilege")
