"""Orchestration: catalog sync, dependency-aware runs, schedules, retries, status, alerts, the demo."""
