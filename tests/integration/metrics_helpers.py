"""Scrape a /metrics endpoint and read sample values, for tests that check a family moves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of every sample the endpoint exposes."""
    text = requests.get(url, timeout=10).text
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


@contextlib.contextmanager
def pipeline_env(unique: str, monkeypatch: pytest.MonkeyPatch, key: str) -> Iterator[dict[str, Any]]:
    """A real simulator, settings pointing at it (unique topic prefix, the current DATABASE_URL,
    e.g. a ``fresh_db``), the schema migrated and the catalog synced, and a MetricsServer of this
    process to scrape."""
    from common.catalog import load_catalog, sync
    from common.config import get_settings, reset_settings
    from common.db import migrate
    from common.metrics import MetricsServer
    from simulator.testing import SimulatorProcess

    with SimulatorProcess(scale=0.002, api_key=key) as sim:
        monkeypatch.setenv("KAFKA_TOPIC_PREFIX", f"m{unique}")
        monkeypatch.setenv("CC_API_BASE_URL", sim.base_url)
        monkeypatch.setenv("CC_API_KEY", key)
        monkeypatch.setenv("ETL_RETRY_DELAY_SECONDS", "0.05")
        reset_settings()
        s = get_settings()
        migrate(s)
        catalog = load_catalog(s)
        sync(catalog, s)
        srv = MetricsServer(0, "test", {}, host="127.0.0.1").start()
        try:
            yield {"settings": s, "catalog": catalog, "sim": sim, "url": f"http://127.0.0.1:{srv.port}/metrics",
                   "unique": unique}
        finally:
            srv.stop()
            reset_settings()
