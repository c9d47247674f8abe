# kdq in one image for laptops, Slurm and Kubernetes (TorchX): `make image`, or
#   podman build -t kdq .                    (docker build works the same)
#   podman run --rm kdq kdq --help
#   podman run --rm -v "$PWD/runs:/workspace/runs" kdq distill --preset demo --epochs 1
#
# BASE must have Python 3.11 with venv. Defaults to the slim Python image; for GPU clusters a CUDA
# runtime base works too (PyTorch's wheels bring their own CUDA libraries), see deploy/kubernetes/README.md.
# Without a registry: deploy/container/base-image.sh builds a Debian one (what CI uses).
ARG BASE=python:3.11-slim-bookworm

# Stage 1: uv, and kdq built as a wheel.
FROM ${BASE} AS builder
ARG UV_VERSION=0.13.9
ENV UV_PYTHON_DOWNLOADS=never \
    UV_SYSTEM_CERTS=1
WORKDIR /src
# An optional CA bundle for registries behind an intercepting proxy:
#   podman build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; fi \
    && python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
COPY pyproject.toml uv.lock README.md ./
COPY kdq ./kdq
COPY export ./export
COPY recipes ./recipes
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export SSL_CERT_FILE=/run/secrets/ca; fi \
    && /opt/uv/bin/uv build --wheel --out-dir /dist

# Stage 2: the runtime. The locked dependencies are installed straight into it (one big layer, cached
# while uv.lock is unchanged: no second copy of it), then kdq's wheel in a small layer of its own.
FROM ${BASE}
LABEL org.opencontainers.image.title="kdq" \
      org.opencontainers.image.description="Distill a big image classifier into a small int8 model"
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/kdq \
    UV_SYSTEM_CERTS=1
# qemu-user: `kdq export` certifies the x86 AVX2 int8 path on any CPU by running ONNX Runtime under an
# emulated AVX2-only CPU (kdq/cpu.py); without it that gate fails on VNNI machines.
RUN apt-get update \
    && apt-get install -y --no-install-recommends "qemu-user=1:7.2+dfsg-7+deb12u*" \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 --user-group kdq \
    && mkdir -p /workspace /data \
    && chown kdq:kdq /workspace /data
# Copied (not bind-mounted) so that a change of the lock invalidates the layer's cache.
COPY pyproject.toml uv.lock /opt/kdq-lock/
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=secret,id=ca,required=false \
    --mount=type=bind,from=builder,source=/opt/uv,target=/opt/uv \
    if [ -s /run/secrets/ca ]; then export SSL_CERT_FILE=/run/secrets/ca; fi \
    && /opt/uv/bin/uv sync --quiet --directory /opt/kdq-lock --frozen --no-dev --no-install-project
# COPY, not a bind mount: podman's layer cache keys a RUN on its text, not on the files it mounts, so a bind-mounted
# wheel would leave a stale kdq in a rebuilt image; a COPY is keyed on the wheel's content.
COPY --from=builder /dist /opt/kdq-dist
RUN --mount=type=bind,from=builder,source=/opt/uv,target=/opt/uv \
    /opt/uv/bin/uv pip install --python /opt/kdq/bin/python --no-deps --no-cache --offline /opt/kdq-dist/kdq-*.whl
COPY deploy/container/entrypoint.sh /usr/local/bin/kdq-entrypoint
ENV PATH=/opt/kdq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KDQ_DATA_DIR=/data
# Numeric, so Kubernetes can check runAsNonRoot.
USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["/usr/local/bin/kdq-entrypoint"]
CMD ["--help"]
