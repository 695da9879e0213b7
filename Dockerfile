# Switchboard server image: CUDA runtime base, a virtualenv built in a separate stage, non-root.
# The base model and the adapters are NOT baked in: mount them (compose.yaml shows how).
#   docker build -t switchboard .
#   docker run --gpus all -v $PWD/build/base:/models/base:ro -v $PWD/build/adapters:/adapters \
#     -p 50051:50051 -p 9400:9400 switchboard
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Versions come with the pinned CUDA image's Ubuntu release; apt pins would break on every update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index, so that no other requirement pulls a different build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip freeze | grep -i '^torch==' > /opt/torch-constraint.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY common ./common
COPY server ./server
COPY clients ./clients
COPY trainer ./trainer
COPY evalsuite ./evalsuite
RUN pip install -c /opt/torch-constraint.txt .

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    LD_PRELOAD=/usr/local/lib/libjemalloc.so.2
# jemalloc: under glibc's allocator the server's RSS grew 10 % over a 5-minute soak before
# levelling off (freed tensor memory kept in the heap); under jemalloc it stayed flat (docs/security.md, Soak).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libjemalloc2 \
    && ln -s "/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2" /usr/local/lib/libjemalloc.so.2 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid switchboard --home-dir /home/switchboard \
       --create-home --shell /usr/sbin/nologin switchboard \
    && mkdir -p /models /adapters /data \
    && chown switchboard:switchboard /adapters /data
COPY --from=build /opt/venv /opt/venv
# /models: the base model (read-only); /adapters: <name>/<version>/ and aliases.json (promotion
# writes the alias file, so it is writable); /data: the SQLite session store.
VOLUME ["/models", "/adapters", "/data"]
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/switchboard
# 50051: gRPC (InferenceService, AdapterService, SessionService, grpc.health.v1); 9400: /metrics.
EXPOSE 50051 9400
# Healthy only when the gRPC health service answers SERVING, i.e. after the base model loaded.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["switchboard-server", "serve"]
CMD ["--base", "/models/base", "--adapters-root", "/adapters", \
     "--host", "0.0.0.0", "--port", "50051", \
     "--metrics-host", "0.0.0.0", "--metrics-port", "9400", \
     "--sessions-db", "/data/sessions.db", "--device", "auto", "--log-json"]
