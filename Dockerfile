# syntax=docker/dockerfile:1
#
# reformer-serve: gRPC and OpenAI-compatible HTTP server for Reformer language models, on a CUDA-enabled
# PyTorch base.
#
#   docker build -t reformer-serve:0.1.0 .
#   docker run --gpus all --stop-timeout 45 -p 50051:50051 -p 8000:8000 -p 9090:9090 reformer-serve:0.1.0
#
# The install steps are the ones scripts/setup.sh runs (torch==2.13.0 first, then the project, then the
# client SDK), so the CI run of those scripts exercises them; tests/test_deploy.py checks that the pins
# agree and lints this file with hadolint. deploy/README.md has the Kubernetes side.

# The official image already holds torch 2.13.0 built for CUDA 12.6 (drivers >= 560; pick a cuda13.x tag
# for newer drivers). Any CUDA-enabled PyTorch 2.13.0 image works: `--build-arg BASE_IMAGE=...`.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

# ---- builder: generate the gRPC stubs from the .proto and build the two wheels ----------------------------
FROM ${BASE_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# Same first step as scripts/setup.sh (on the matching base image it finds torch already installed), then
# grpcio-tools, the one build-time dependency of the codegen step, at the version that generated the
# committed stubs: the image's stubs are then the reviewed ones (tests/test_deploy.py checks the pin).
RUN pip install torch==2.13.0 \
    && pip install grpcio-tools==1.85.1

COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY scripts/gen_protos.py scripts/gen_protos.py
COPY reformer_infer/ reformer_infer/
COPY server/ server/
COPY clients/python/ clients/python/

# The stubs are committed too; regenerating them here makes the image follow the .proto it was built from.
RUN python scripts/gen_protos.py \
    && pip wheel --no-deps --wheel-dir /wheels . ./clients/python

# ---- runtime: the wheels installed for a non-root user ---------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# A fixed uid so that Kubernetes' runAsNonRoot / runAsUser (deploy/deployment.yaml) can name it.
RUN groupadd --system --gid 10001 reformer \
    && useradd --system --uid 10001 --gid reformer --create-home --home-dir /home/reformer \
       --shell /usr/sbin/nologin reformer

COPY --from=builder /wheels /tmp/wheels
# As scripts/setup.sh: torch first (a no-op on the matching base), then the server and the client SDK.
RUN pip install torch==2.13.0 \
    && pip install /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels

COPY deploy/healthcheck.py /opt/reformer/healthcheck.py

USER 10001:10001
WORKDIR /home/reformer

# Inside a container the server must listen on all interfaces; the flags still override these.
ENV REFORMER_HOST=0.0.0.0 \
    REFORMER_PORT=50051 \
    REFORMER_HTTP_PORT=8000 \
    REFORMER_METRICS_PORT=9090

# gRPC (generation, health, reflection), the OpenAI-compatible HTTP API and the Prometheus metrics endpoint.
EXPOSE 50051 8000 9090

# "healthy" means the generation service is SERVING: the model is loaded and warmed up, not draining.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "/opt/reformer/healthcheck.py"]

# On SIGTERM the server drains running streams for --grace-period seconds (default 30); give `docker stop`
# a longer timeout (--stop-timeout 45) so the drain is not cut short by SIGKILL.
STOPSIGNAL SIGTERM

# With no --model the server loads the model bundled in the reformer_infer package.
CMD ["reformer-server", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]
