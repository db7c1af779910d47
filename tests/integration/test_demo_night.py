"""The demo's nights replay exactly: a restarted simulator given the recorded nights serves the same
data as the one that lived through them (orchestrator/demo_night.py)."""

from __future__ import annotations

import json

import pytest

from orchestrator import demo_night
from simulator.testing import SimulatorProcess

pytestmark = pytest.mark.integration


def test_recorded_nights_replay_to_the_same_data(tmp_path) -> None:
    state = tmp_path / "demo.json"
    state.write_text(json.dumps({"scale": 0.002, "seed": 5}))
    with SimulatorProcess(scale=0.002, seed=5, api_key="night-key") as lived:
        for _ in range(2):
            n = demo_night.apply_night(lived.admin_url)
            demo_night.record_night(state, {"days": 1, "seq": n["seq"], "clock": n["clock"]})
        assert n["clock"] == "2025-12-03T00:00:00.000Z" and n["changed"] > 0
        truth = {job: lived.expected(job=job) for job in (10, 9, 25, 127)}
    nights = demo_night.recorded_nights(state)
    assert [x["clock"] for x in nights] == ["2025-12-02T00:00:00.000Z", "2025-12-03T00:00:00.000Z"]
    with SimulatorProcess(scale=0.002, seed=5, api_key="night-key") as restarted:
        demo_night.replay_nights(restarted.admin_url, nights)
        assert {job: restarted.expected(job=job) for job in truth} == truth
    # a record that does not match the simulator's data stops the demo with a clear error
    with SimulatorProcess(scale=0.002, seed=5, api_key="night-key") as other:
        with pytest.raises(RuntimeError, match="no longer matches the warehouse"):
            demo_night.replay_nights(other.admin_url, [{"days": 2, "clock": "2025-12-02T00:00:00.000Z"}])
