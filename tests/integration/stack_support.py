"""A private embedded stack driven through the real ``trialsync`` CLI, for the stack's own tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.loader_support import REPO, TRIALSYNC

_OUTSIDE = ("DATABASE_URL", "DATABASE_HOST", "KAFKA_BOOTSTRAP_SERVERS", "TRIALSYNC_STATE_DIR", "KAFKA_TOPIC_PREFIX",
            "TRIALSYNC_BROKER_STORAGE", "CC_API_BASE_URL", "CC_API_KEY")


class PrivateStack:
    """``trialsync stack up`` in its own state directory (removed with ``close``)."""

    def __init__(self, storage: str = "durable", state_dir: Path | None = None, **env: str):
        self.dir = state_dir or Path(tempfile.mkdtemp(prefix="trialsync-stacktest-"))
        if state_dir is None:
            self.dir.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if k not in _OUTSIDE}
        self.env.update({"TRIALSYNC_STATE_DIR": str(self.dir), "TRIALSYNC_BROKER_STORAGE": storage,
                         "LOG_FORMAT": "json", "ENABLE_METRICS": "false", "COLUMNS": "200", **env})

    def cli(self, *args: str, timeout: float = 180, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([TRIALSYNC, *args], env={**self.env, **env}, cwd=REPO, capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"trialsync {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def status(self) -> tuple[int, dict[str, Any]]:
        p = self.cli("stack", "status", "--json", check=False)
        return p.returncode, json.loads(p.stdout)

    def settings(self) -> Any:
        from common.config import Settings

        st = self.state()
        return Settings(trialsync_state_dir=self.dir, database_url=self.dsn(), database_host=None,
                        kafka_bootstrap_servers=f"127.0.0.1:{st.kafka_port}", enable_metrics=False)

    def state(self) -> Any:
        from common import stack
        from common.config import Settings

        return stack.read_state(Settings(trialsync_state_dir=self.dir))

    def dsn(self, db: str = "trialsync") -> str:
        """The superuser's DSN (its password lives in this stack's state directory)."""
        from common import stack
        from common.config import Settings

        return stack.database_dsn(Settings(trialsync_state_dir=self.dir, database_url=None, database_host=None),
                                  dbname=db, login="admin")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cli("stack", "down", "--purge", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
