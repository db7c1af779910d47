"""compose.yaml and the Dockerfile: structure checked in Python everywhere, and
`docker-compose config` where docker-compose is installed (no engine needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
TRIALSYNC = ("migrate", "loader", "transform", "scheduler", "api", "simulator")


def test_all_parts_are_there() -> None:
    assert {"redpanda", "console", "postgres", "prometheus", "grafana", *TRIALSYNC} <= set(SERVICES)
    assert SERVICES["postgres"]["image"].startswith("postgres:16")
    assert "--mode=dev-container" in SERVICES["redpanda"]["command"]
    assert "--smp=1" in SERVICES["redpanda"]["command"]
    assert SERVICES["simulator"]["profiles"] == ["simulator"]


def test_every_service_has_healthcheck_and_restart_policy() -> None:
    for name, svc in SERVICES.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no health check"
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), f"{name} has no restart policy"


def test_images_are_pinned() -> None:
    for name, svc in SERVICES.items():
        image = svc.get("image", "")
        if name in TRIALSYNC:
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image} is not pinned"
        tag = image.rsplit(":", 1)[1]
        assert re.search(r"\d+\.\d+", tag), f"{name}: {image} needs an exact version tag"


def test_trialsync_services_use_the_one_dockerfile_and_wait_for_migrate() -> None:
    for name in TRIALSYNC:
        svc = SERVICES[name]
        assert svc["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name
        assert svc["image"] == "trialsync:local", name
        assert svc["env_file"] == ".env", name
        env = svc["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "redpanda:9092" and env["DATABASE_HOST"] == "postgres", name
    for name in ("loader", "transform", "scheduler", "api"):
        deps = SERVICES[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redpanda"]["condition"] == "service_healthy", name
        assert "/readyz" in " ".join(SERVICES[name]["healthcheck"]["test"]), name
    assert "trialsync db migrate && trialsync jobs sync" in SERVICES["migrate"]["command"][0]


def test_commands_exist_in_the_cli() -> None:
    """Each service's command is a real `trialsync` command (once its package has landed)."""
    from common.cli import app

    registered = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert "api" in registered and "db" in registered and "jobs" in registered
    for name in ("loader", "transform", "scheduler", "simulator"):
        cmd = SERVICES[name]["command"][0]
        if cmd not in registered:
            pytest.skip(f"`trialsync {cmd}` has not landed yet")


def test_dockerfile_is_multistage_nonroot_pinned_and_uses_the_lock() -> None:
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.M)
    assert len(froms) >= 2, "multi-stage build expected"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert base and re.fullmatch(r"python:3\.12\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1)), base
    assert "-r requirements.lock" in text
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0"), "must run as a non-root user"
    assert re.search(r"^HEALTHCHECK ", text, re.M)
    assert re.search(r'^ENTRYPOINT \["trialsync"\]', text, re.M)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ".env" in ignore and ".venv" in ignore and ".git" in ignore


def test_dockerfile_copies_every_package() -> None:
    """The image gets the whole source minus .dockerignore; nothing the services need is ignored."""
    import tomllib

    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^COPY \. \.$", text, re.M)
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    pkgs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {p.rstrip("*") for p in pkgs} | {"sql", "config", "data", "pyproject.toml", "README.md"}
    assert not needed & ignored, f".dockerignore excludes what the image needs: {needed & ignored}"


DOCKER_COMPOSE = shutil.which("docker-compose")
_SECRETS_ENV = ("DATABASE_ADMIN_PASSWORD=admin-pw\nDATABASE_WRITER_PASSWORD=writer-pw\nDATABASE_READER_PASSWORD=reader-pw\n"
                "API_TOKEN=tok\nGRAFANA_ADMIN_PASSWORD=grafana-pw\n")


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose not installed (apt-get install docker-compose)")
def test_docker_compose_config_validates(tmp_path: Path) -> None:
    # compose needs the .env the services read: use the example, as an operator would
    for f in ("compose.yaml", "Dockerfile"):
        shutil.copy(REPO / f, tmp_path / f)
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")
    (tmp_path / ".env").write_text((REPO / ".env.example").read_text() + "\n" + _SECRETS_ENV)
    proc = subprocess.run([DOCKER_COMPOSE, "-f", "compose.yaml", "config"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    svc = resolved["services"]
    assert svc["postgres"]["environment"]["POSTGRES_PASSWORD"] == "admin-pw"
    assert svc["loader"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "redpanda:9092"
    # least privilege: only migrate logs in as the superuser; services as the writer, the API as the reader
    assert (svc["migrate"]["environment"]["DATABASE_USER"], svc["migrate"]["environment"]["DATABASE_PASSWORD"]) == (
        "postgres", "admin-pw")
    for name in ("loader", "transform", "scheduler"):
        env = svc[name]["environment"]
        assert (env["DATABASE_USER"], env["DATABASE_PASSWORD"]) == ("trialsync_writer", "writer-pw"), name
        assert env["DATABASE_ADMIN_PASSWORD"] == "" and env["API_TOKEN"] == "" and env["GRAFANA_ADMIN_PASSWORD"] == ""
        assert env["METRICS_HOST"] == "0.0.0.0", name
    api = svc["api"]["environment"]
    assert (api["DATABASE_USER"], api["DATABASE_PASSWORD"], api["API_TOKEN"]) == ("trialsync_reader", "reader-pw", "tok")
    assert api["DATABASE_WRITER_PASSWORD"] == "" and api["DATABASE_ADMIN_PASSWORD"] == ""
    assert svc["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "grafana-pw"
    proc = subprocess.run([DOCKER_COMPOSE, "-f", "compose.yaml", "--profile", "simulator", "config", "--services"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "simulator" in proc.stdout.split()


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose not installed")
@pytest.mark.parametrize("missing", ["DATABASE_ADMIN_PASSWORD", "DATABASE_WRITER_PASSWORD", "DATABASE_READER_PASSWORD",
                                     "API_TOKEN", "GRAFANA_ADMIN_PASSWORD"])
def test_docker_compose_refuses_a_missing_secret(tmp_path: Path, missing: str) -> None:
    """No default passwords: without any one of them compose refuses to start, naming it (Grafana
    never comes up as admin/admin, the history API never without a token)."""
    shutil.copy(REPO / "compose.yaml", tmp_path / "compose.yaml")
    env = "".join(line + "\n" for line in _SECRETS_ENV.splitlines() if not line.startswith(missing + "="))
    (tmp_path / ".env").write_text("CC_API_KEY=x\n" + env)
    proc = subprocess.run([DOCKER_COMPOSE, "-f", "compose.yaml", "config"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and f"set {missing} in .env" in proc.stderr, proc.stderr


def test_compose_secrets_have_no_defaults() -> None:
    text = (REPO / "compose.yaml").read_text()
    for var in ("DATABASE_ADMIN_PASSWORD", "DATABASE_WRITER_PASSWORD", "DATABASE_READER_PASSWORD", "API_TOKEN",
                "GRAFANA_ADMIN_PASSWORD"):
        assert f"${{{var}:?" in text and f"${{{var}:-" not in text, var
