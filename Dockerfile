# syntax=docker/dockerfile:1
# TrialSync: one image for every service (loader, transform, scheduler, api, simulator, migrate).
# Multi-stage: the build stage resolves the pinned dependencies (requirements.lock) into a venv;
# the runtime stage copies only that venv and the source, and runs as an unprivileged user.
#
#   docker build -t trialsync:local .
#   docker run --rm trialsync:local --help

# Exact tag (reproducible; bump deliberately). To pin by digest as well:
#   docker buildx imagetools inspect python:3.12.11-slim-bookworm  -> PYTHON_IMAGE=python:3.12.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

# ---- build ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy
RUN python -m venv /opt/venv && /opt/venv/bin/pip install "uv==0.13.9"
WORKDIR /app
# dependencies first: this layer is rebuilt only when the lock changes
COPY requirements.lock ./
RUN /opt/venv/bin/uv pip install --python /opt/venv/bin/python -r requirements.lock
# the source: packages, sql/, config/, data/ (.dockerignore keeps out .git, .venv, tests, docs, secrets)
COPY . .
# editable install: the `trialsync` entry point, with sql/ and config/ beside the packages
RUN /opt/venv/bin/uv pip install --python /opt/venv/bin/python --no-deps -e . \
    && /opt/venv/bin/python -m compileall -q /app common schemas producers consumers orchestrator simulator \
    && /opt/venv/bin/pip uninstall -y uv

# ---- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="trialsync" \
      org.opencontainers.image.description="Clinical Conductor -> Kafka-API topics -> PostgreSQL 16 warehouse ETL"
RUN groupadd --system --gid 10001 trialsync \
    && useradd --system --uid 10001 --gid trialsync --home-dir /app --no-create-home --shell /usr/sbin/nologin trialsync
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    METRICS_PORT=9108 \
    TRIALSYNC_STATE_DIR=/tmp/trialsync
USER 10001:10001
EXPOSE 9108 8000
# process alive = its metrics server answers; compose adds /readyz probes per service
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METRICS_PORT','9108'), timeout=4); sys.exit(0)"]
ENTRYPOINT ["trialsync"]
CMD ["--help"]
