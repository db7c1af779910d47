"""Settings: each bad value fails with one line naming the setting, the value and what is allowed."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for k in ("DATABASE_URL", "DATABASE_HOST", "CC_API_KEY", "ETL_BATCH_SIZE", "KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize(
    ("env", "value", "expect"),
    [
        ("ETL_BATCH_SIZE", "abc", "ETL_BATCH_SIZE='abc'"),
        ("ETL_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("ETL_PARALLEL_JOBS", "-3", "ETL_PARALLEL_JOBS='-3'"),
        ("ETL_MAX_RETRIES", "many", "ETL_MAX_RETRIES"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL='LOUD'"),
        ("METRICS_PORT", "70000", "METRICS_PORT"),
        ("CC_API_BASE_URL", "ftp://x", "must start with http:// or https://"),
        ("KAFKA_BOOTSTRAP_SERVERS", "localhost", "must be host:port"),
        ("ENABLE_METRICS", "perhaps", "ENABLE_METRICS"),
        ("CC_API_KEY_HEADER", "X Api Key", "CC_API_KEY_HEADER"),
        ("KAFKA_TOPIC_PREFIX", "bad prefix!", "KAFKA_TOPIC_PREFIX"),
    ],
)
def test_bad_value_is_one_line_naming_setting(monkeypatch: pytest.MonkeyPatch, env: str, value: str, expect: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as e:
        load_settings()
    msg = str(e.value)
    assert "\n" not in msg
    assert env in msg
    assert expect in msg


def test_secret_values_never_in_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://user:hunter2-secret@host/db")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert "hunter2-secret" not in str(e.value)
    assert "DATABASE_URL" in str(e.value)


def test_secrets_are_secretstr_and_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC_API_KEY", "k-123-very-secret")
    s = load_settings()
    assert "k-123-very-secret" not in repr(s)
    assert "k-123-very-secret" not in str(s.model_dump())
    assert s.cc_api_key is not None and s.cc_api_key.get_secret_value() == "k-123-very-secret"
    assert "k-123-very-secret" in s.secret_values()


def test_database_parts_build_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_HOST", "db.example")
    monkeypatch.setenv("DATABASE_PASSWORD", "p@ss/word")
    s = load_settings()
    assert not s.uses_embedded_database
    assert s.explicit_dsn() == "postgresql://trialsync:p%40ss%2Fword@db.example:5432/trialsync"
    assert "p@ss/word" in s.secret_values()


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / ".env").write_text("ETL_BATCH_SIZE=250\nKAFKA_TOPIC_PREFIX=acme\n")
    s = load_settings()
    assert s.etl_batch_size == 250
    assert s.kafka_topic_prefix == "acme"


def test_defaults_are_embedded() -> None:
    s = load_settings()
    assert s.uses_embedded_database and s.uses_embedded_broker
    assert s.cc_api_key_header == "X-ApiKey"
