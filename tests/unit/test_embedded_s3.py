"""Without Node.js the durable broker cannot start: one line that says what to do, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import embedded_s3, stack
from common.config import load_settings


def test_no_node_means_no_s3_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_s3.shutil, "which", lambda _name: None)
    assert embedded_s3.s3rver_command() is None


def test_durable_broker_without_node_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(embedded_s3, "s3rver_command", lambda: None)
    s = load_settings(trialsync_state_dir=tmp_path, trialsync_broker_storage="durable")
    with pytest.raises(stack.StackError, match=r"needs s3rver .*make install.*TRIALSYNC_BROKER_STORAGE=memory"):
        stack.start_broker(s, stack.StackState())
    assert not (tmp_path / "kafka" / "s3").exists()


def test_tansu_gets_the_local_endpoint_and_credentials() -> None:
    env = embedded_s3.tansu_env(4568)
    assert env["AWS_ENDPOINT"] == "http://127.0.0.1:4568" and env["AWS_ALLOW_HTTP"] == "true"
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == embedded_s3.LOCAL_ACCESS_KEY
