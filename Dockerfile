# remoteloss-server with a CUDA-enabled torch; runs on the CPU where no GPU is given to it.
#
#   docker build -t remoteloss:0.1.0 .
#   docker run --gpus 1 -p 50051:50051 -p 8000:8000 -p 9464:9464 remoteloss:0.1.0
#
# Base: Debian's slim Python image plus torch==2.13.0 from PyPI. PyPI's Linux x86_64 torch wheel
# is the CUDA build: its CUDA 13.0 runtime, cuDNN and NCCL come as wheels that torch itself pins,
# so the image needs no CUDA toolkit, only the host's NVIDIA driver (one recent enough for CUDA
# 13.0), which the NVIDIA Container Toolkit mounts in at run time. Not nvidia/cuda:*-runtime: its
# CUDA libraries would be a second copy of the wheels' (gigabytes). Not pytorch/pytorch: its conda
# Python and torch would have to track this project's pin by hand. The pin matches
# scripts/install.sh (which scripts/test.sh runs), so the image runs the torch the tests ran.
#
# Every server setting is an environment variable (REMOTELOSS_<FLAG>, e.g. REMOTELOSS_DEVICE,
# REMOTELOSS_MAX_BATCH_SIZE; `docker run --rm remoteloss:0.1.0 remoteloss-server --help` lists
# them), or a flag: `docker run ... remoteloss:0.1.0 remoteloss-server --workers 2`.
FROM python:3.11-slim-bookworm

# NVIDIA_DRIVER_CAPABILITIES: the NVIDIA runtime mounts only the driver parts named here; unset
# means "utility" (nvidia-smi) without "compute" (CUDA).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# torch first, in its own layer: it is most of the image and changes least often.
RUN pip install --no-cache-dir torch==2.13.0

# The two distributions from source: remoteloss (client/: the SDK, whose codec, wire framing and
# stubs the server uses, and the `remoteloss` command the health check runs) and
# remoteloss-server (server/), which needs that very version of remoteloss. The server's native
# front (server/native/) is built against Debian's gRPC C++ library; the compiler and
# headers go again, the library (libgrpc++1.51 and what it needs) stays. The import checks that
# the front was built: without it the server would fall back to grpc.aio's.
WORKDIR /src
COPY client ./client
COPY server ./server
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ pkg-config libgrpc++-dev \
    && pip install --no-cache-dir ./client ./server \
    && python -c "import remoteloss_server._front" \
    && apt-mark manual libgrpc++1.51 >/dev/null \
    && apt-get purge -y --auto-remove g++ pkg-config libgrpc++-dev \
    && rm -rf /var/lib/apt/lists/* /src \
    && groupadd --gid 10001 remoteloss \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin remoteloss

WORKDIR /home/remoteloss
USER 10001:10001

# Every interface: the server's default is loopback only, which nothing outside the container
# could reach. The rest are the server's defaults, spelled out because the health check and the
# EXPOSE lines rely on them.
ENV REMOTELOSS_HOST="[::]" \
    REMOTELOSS_PORT=50051 \
    REMOTELOSS_HTTP_PORT=8000 \
    REMOTELOSS_METRICS_PORT=9464 \
    REMOTELOSS_GRACE_PERIOD=10
# gRPC (LossService, the Open Inference Protocol, health, reflection), the Open Inference
# Protocol over HTTP/REST, and Prometheus /metrics.
EXPOSE 50051 8000 9464

# The standard gRPC health service, asked by the project's own client (exit 0 only for SERVING):
# NOT_SERVING from the moment the server starts draining. The start period covers importing
# torch and initialising CUDA.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "remoteloss --target \"127.0.0.1:${REMOTELOSS_PORT}\" --timeout 3 health --service remoteloss.v1.LossService >/dev/null || exit 1"]

# Exec form: the server is PID 1 and gets SIGTERM itself, then drains for REMOTELOSS_GRACE_PERIOD
# seconds; give `docker stop -t` (compose: stop_grace_period) more than that.
CMD ["remoteloss-server"]
