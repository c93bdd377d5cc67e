# syntax=docker/dockerfile:1
# The server's image: llama-cpp-python compiled once in a builder stage, a slim runtime without
# compilers, a non-root user, gunicorn as the process that receives SIGTERM.
#
#   docker build -t llm-server .
#   docker run -e SECRET_KEY=$(openssl rand -hex 32) -v llm-models:/data/models llm-server \
#       python scripts/install_model.py           # once: the default model into the volume
#   docker run -d -p 5000:5000 -e SECRET_KEY=... -v llm-models:/data/models \
#       --stop-timeout 90 llm-server
#
# SIGTERM drain: the worker drains for SHUTDOWN_TIMEOUT (60 s by default) and gunicorn's
# graceful_timeout is SHUTDOWN_TIMEOUT + 10, so `docker stop -t`, compose's stop_grace_period
# and Kubernetes' terminationGracePeriodSeconds must exceed SHUTDOWN_TIMEOUT + 10 (90 s here).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# Bookworm's versions, pinned so a rebuild compiles with the same toolchain.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 cmake=3.25.1-1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY requirements.txt .
# Every requirement as a wheel: llama-cpp-python compiles llama.cpp here, once. Not for the
# build machine's CPU (GGML_NATIVE=OFF) but for x86-64-v3 (AVX2, FMA, F16C: any x86 server since
# 2013), so the image runs wherever it is pulled; --build-arg GGML_CPU_ARGS=-DGGML_NATIVE=ON
# builds for the build machine instead (and is the choice on arm64).
ARG GGML_CPU_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
ARG LLAMA_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"
RUN CMAKE_ARGS="${GGML_CPU_ARGS} ${LLAMA_ARGS}" \
    pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt

FROM ${PYTHON_IMAGE} AS runtime
# llama.cpp's CPU backend uses OpenMP (libgomp); nothing else beyond the slim image is needed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1=12.2.0-14+deb12u1 \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid, so volumes prepared on the host or by Kubernetes' fsGroup match it.
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid app --no-create-home --home-dir /app --shell /usr/sbin/nologin app
# The builder's wheels are bind-mounted for this one step, not copied: a COPY layer would keep
# them (llama.cpp and the default model's package) in the image a second time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    pip install --no-cache-dir --no-index --find-links /wheels -r /tmp/requirements.txt
WORKDIR /app
COPY --chown=root:root . .
# The state lives under /data, never under /app: /app/models is the Python package `models`,
# which a volume mounted there would hide. Owned by the app user, so a fresh named volume
# (initialised from the image's directory) is writable by it.
RUN mkdir -p /data/models /data/deepseek /data/logs /data/state \
    && chown -R app:app /data
VOLUME ["/data/models", "/data/deepseek", "/data/logs", "/data/state"]
# Production settings; SECRET_KEY has no default on purpose: without it the server (and
# scripts/install_model.py) exits with "SECRET_KEY must be set when APP_ENV=production".
ENV APP_ENV=production \
    HOST=0.0.0.0 \
    PORT=5000 \
    MODELS_DIR=/data/models \
    DEEPSEEK_MODELS_DIR=/data/deepseek \
    LOG_DIR=/data/logs \
    DATA_DIR=/data/state \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 5000
# Liveness: /health answers at once even when every worker is busy; the 10 s timeout is for the
# probe's own Python start on a loaded machine. The start period covers the app's start-up (a
# model's first load happens on its first use, not here).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "scripts/healthcheck.py", "/health"]
STOPSIGNAL SIGTERM
# gunicorn is PID 1 (exec form, no shell): its arbiter handles SIGTERM itself (the worker drains,
# see api/gunicorn_worker.py) and reaps every child with waitpid(-1), the orphaned model-trial
# processes included, so an init such as tini would add nothing.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app_factory:create_app()"]
