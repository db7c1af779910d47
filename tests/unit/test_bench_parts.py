"""Pure parts of the benchmark suite: the dlt peer's configuration and the process-tree walk."""

from __future__ import annotations

import os

from bench.peer_dlt import dlt_environment, rest_api_config
from bench.procwatch import ProcWatch, descendants

SPEC = {"base_url": "http://127.0.0.1:1/CCSWEB/", "key_header": "X-ApiKey", "workers": 5, "page_size": 1000,
        "pipelines_dir": "/tmp/x",
        "jobs": [{"id": 9, "name": "PatientVisits", "endpoint": "/api/v1/patient-visits/odata", "odata": True},
                 {"id": 1, "name": "Sites", "endpoint": "/api/v1/sites", "odata": False}]}


def test_dlt_config_pages_odata_with_top_and_skip_and_sends_the_key_header() -> None:
    cfg = rest_api_config(SPEC, "k3y")
    assert cfg["client"]["base_url"] == "http://127.0.0.1:1/CCSWEB/"
    assert cfg["client"]["auth"] == {"type": "api_key", "name": "X-ApiKey", "api_key": "k3y", "location": "header"}
    pv, sites = cfg["resources"]
    assert pv["endpoint"]["path"] == "api/v1/patient-visits/odata"
    assert pv["endpoint"]["paginator"] == {"type": "offset", "limit": 1000, "offset_param": "$skip",
                                           "limit_param": "$top", "total_path": None, "stop_after_empty_page": True}
    assert sites["endpoint"]["paginator"] == {"type": "single_page"}
    assert pv["name"] != sites["name"]  # jobs 2 and 164 share a table in TrialSync: dlt keeps one table per job
    assert cfg["resource_defaults"]["write_disposition"] == "append"


def test_dlt_environment_matches_trialsync_parallelism_and_disables_telemetry() -> None:
    env = dlt_environment(SPEC)
    assert env["EXTRACT__WORKERS"] == env["LOAD__WORKERS"] == "5"
    assert env["RUNTIME__DLTHUB_TELEMETRY"] == "false"


def test_descendants_walks_the_tree_below_a_root_only() -> None:
    table = {1: (0, 0), 10: (1, 0), 11: (10, 0), 12: (10, 0), 20: (1, 0), 30: (99, 0)}
    assert sorted(descendants(10, table)) == [10, 11, 12]
    assert descendants(30, table) == [30]
    assert descendants(77, table) == []


def test_procwatch_measures_this_process() -> None:
    w = ProcWatch(interval=0.05)
    w.add("me", os.getpid(), "self")
    w.start()
    sum(i * i for i in range(300_000))  # some CPU
    out = w.stop()
    assert out["me"]["peak_process_mib"] > 1 and out["me"]["max_processes"] == 1
    assert out["machine"]["cores"] == os.cpu_count()
