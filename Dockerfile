# kafka-sidecar container image.
#
#   docker build -t kafka-sidecar .                      # or: podman build -t kafka-sidecar .
#   docker run -v $PWD/sidecar.yaml:/etc/kafka-sidecar/config.yaml:ro kafka-sidecar
#
# Build args:
#   BASE_IMAGE  an image with Python 3.11+ (with its venv module) and CA certificates; the
#               official slim Python image by default. Both stages use it, so the venv built
#               in the first finds the same interpreter in the second.
#   PYTHON      the interpreter to build the venv with (python3: /usr/local/bin/python3 in the
#               official image, /usr/bin/python3 in a Debian one).
#   PIP_CERT    a CA bundle for pip, for builds behind a TLS-inspecting proxy (mount it with
#               the builder's -v/--secret); a build arg so it never lands in the image.
#   UID         the numeric user the sidecar runs as (not root).
#   CARGO_BUILD_JOBS  how many compile jobs the Rust build runs (all cores when unset).
#
# The builder also compiles the record-batch transcoder (transcoder/, Rust through maturin), so
# it needs a Rust toolchain (1.85+) and a C compiler: taken as they are when the base has cargo,
# else installed with apt-get from the base's own Debian packages, and crates.io for the crates
# of transcoder/Cargo.lock. The final stage is the base plus the venv: no compilers, no pip, no
# build tools.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ARG PYTHON=python3
ARG PIP_CERT=""
ARG CARGO_BUILD_JOBS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# Before the sources, so a layer cache keeps the toolchain across source changes. Debian's
# `cargo` is Rust 1.63 on bookworm, too old for the crates; `cargo-web`, the toolchain Debian
# keeps recent for its browsers (1.85+ on bookworm and trixie), is taken where the release has
# it, else `cargo`. Versions are not pinned: they are whatever the base's release carries, and
# this stage is thrown away.
# hadolint ignore=DL3008
RUN if ! command -v cargo >/dev/null; then \
      apt-get update \
      && rust=cargo && if [ -n "$(apt-cache madison cargo-web)" ]; then rust=cargo-web; fi \
      && apt-get install -y --no-install-recommends "$rust" gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && cargo --version
WORKDIR /src
# Only what the wheels need (.dockerignore keeps the rest of the checkout, transcoder/target
# included, out of the context): the sidecar, the `kafkasidecar` package (generated stubs and
# client) and the `kafka_sidecar_transcoder` package its wheel ships, and the crate that the
# transcoder's wheel (the compiled module alone) is built from.
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
COPY clients/python/src/kafkasidecar/ clients/python/src/kafkasidecar/
COPY transcoder/python/kafka_sidecar_transcoder/ transcoder/python/kafka_sidecar_transcoder/
COPY transcoder/pyproject.toml transcoder/Cargo.toml transcoder/Cargo.lock transcoder/
COPY transcoder/src/ transcoder/src/
# An empty PIP_CERT must not reach pip (it would read it as a path), hence the shell test; cargo
# fetches crates through the same proxy, so it gets the same CA bundle. An empty
# CARGO_BUILD_JOBS is not a number to cargo.
RUN if [ -n "$PIP_CERT" ]; then export PIP_CERT CARGO_HTTP_CAINFO="$PIP_CERT"; else unset PIP_CERT; fi \
    && if [ -z "$CARGO_BUILD_JOBS" ]; then unset CARGO_BUILD_JOBS; fi \
    && "$PYTHON" -m venv /opt/kafka-sidecar \
    && /opt/kafka-sidecar/bin/python -m pip install --no-cache-dir /src /src/transcoder \
    && /opt/kafka-sidecar/bin/python -m pip uninstall --yes pip setuptools \
    && /opt/kafka-sidecar/bin/kafka-sidecar --version \
    && /opt/kafka-sidecar/bin/python -c 'import kafkasidecar.v1.consumer_pb2_grpc, sidecar.server'

FROM ${BASE_IMAGE}
ARG UID=10001
LABEL org.opencontainers.image.title="kafka-sidecar" \
      org.opencontainers.image.description="Consumes Kafka (AWS MSK with IAM auth) for an app and streams batches to it over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
# A real passwd entry (not only a numeric USER): some libraries look the user up.
RUN useradd --no-log-init --uid "$UID" --user-group \
      --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin kafka-sidecar \
    && mkdir -p /etc/kafka-sidecar /var/run/kafka-sidecar \
    && chown "$UID:$UID" /var/run/kafka-sidecar
COPY --from=builder /opt/kafka-sidecar /opt/kafka-sidecar
# The .pyc files were compiled at install; a read-only root filesystem cannot take new ones.
ENV PATH=/opt/kafka-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KAFKA_SIDECAR_CONFIG=/etc/kafka-sidecar/config.yaml
# Without the compiled transcoder the package would quietly run its pure-Python twin: fail the
# build instead, and here, where the builder's toolchain is gone, so the module must load alone.
RUN ["/opt/kafka-sidecar/bin/python", "-c", "import kafka_sidecar_transcoder as t; assert t.IMPLEMENTATION == 'native', t.IMPLEMENTATION"]
USER ${UID}:${UID}
# gRPC for apps (the config's listen.grpc, 127.0.0.1 by default, which the other containers of
# a pod share; a Unix socket under /var/run/kafka-sidecar is the other choice), the health-only
# gRPC listener for probes (listen.health, off by default; the Helm chart puts it on 50052 on
# the pod IP) and Prometheus metrics (listen.metrics, 127.0.0.1 by default; the chart binds
# the pod IP, since Prometheus scrapes from outside the pod).
EXPOSE 50051 50052 9464
# The sidecar itself is PID 1: it handles SIGTERM (drain, commit, leave the group, exit 0).
ENTRYPOINT ["kafka-sidecar"]
CMD ["run"]
