# syntax=docker/dockerfile:1
# edge-proxy: docker build -t edge-proxy:0.1.0 .
# The same Python image in both stages: the virtualenv built in the first is copied into the second, and its
# interpreter symlink must point at the same Python. Override it with --build-arg PYTHON_IMAGE=... (pin a digest
# in production: python:3.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Optional, for a package mirror or a TLS-intercepting proxy (a CA bundle mounted into the build); unset, they are
# not in the environment at all, and build args never reach the runtime stage.
ARG PIP_INDEX_URL
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Without pip or setuptools of its own (ensurepip's, which would float with the base image and carry their
# CVEs into the runtime): the base image's pip installs into it (--python).
RUN python3 -m venv --without-pip /opt/edge-proxy

# Dependencies before code: this layer is rebuilt only when a lock changes. The locks (`make lock`, from
# pyproject.toml's ranges) pin every package and its hashes: two builds of one commit get the same
# versions, the ones the tests ran with (make install installs the same pins), or the build fails. EXTRAS
# picks the lock: otlp by default (OTEL_EXPORTER_OTLP_ENDPOINT is often set pod-wide, and without the
# exporter the proxy refuses to start); --build-arg EXTRAS= leaves it out. pip check proves the lock whole.
ARG EXTRAS="otlp"
COPY requirements/image.lock requirements/image-otlp.lock requirements/
RUN lock="requirements/image${EXTRAS:+-$EXTRAS}.lock" \
    && { test -f "$lock" || { echo "EXTRAS must be otlp or empty, not '$EXTRAS'" >&2; exit 1; }; } \
    && python3 -m pip --python /opt/edge-proxy/bin/python install --require-hashes --no-deps --requirement "$lock" \
    && python3 -m pip --python /opt/edge-proxy/bin/python check

COPY pyproject.toml README.md ./
COPY proxy/ proxy/
# --no-deps: everything it needs is installed above. setuptools builds it in pip's isolated build
# environment (the one thing fetched unpinned; it never reaches the image). The bytecode is compiled here
# with unchecked-hash pycs: the root filesystem is read-only at runtime, so nothing could be cached then,
# and the image never changes.
RUN python3 -m pip --python /opt/edge-proxy/bin/python install --no-deps . \
    && python3 -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/edge-proxy/lib

FROM ${PYTHON_IMAGE} AS runtime
# The base image's own installers (pip, and before Python 3.12 setuptools and wheel, in /usr/local) are build
# tools: nothing at runtime uses them (the virtualenv has none and does not see them), and scanners report their
# CVEs. A base whose python3 has no pip (a distribution's) has none to remove.
# The official slim images ship the standard library without .pyc files; compile it once here, or every start
# on a read-only root would compile it in memory again. The numeric user has a passwd entry for tools.
RUN if python3 -m pip --version >/dev/null 2>&1; then python3 -m pip uninstall --yes --no-cache-dir --disable-pip-version-check pip setuptools wheel; fi \
    && python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
    && groupadd --system --gid 10001 edge-proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin edge-proxy

COPY --from=build /opt/edge-proxy /opt/edge-proxy
# The default config (every key at its default); Kubernetes mounts the chart's ConfigMap over /etc/edge-proxy.
COPY config/edge-proxy.yaml /etc/edge-proxy/config.yaml

# EDGE_PROXY_CONFIG: the file a command run in the container reads when not given --config (kubectl exec
# ... edge-proxy offload status then sees the same defaults as the proxy it controls).
ENV PATH=/opt/edge-proxy/bin:$PATH \
    EDGE_PROXY_CONFIG=/etc/edge-proxy/config.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
# Docker only (Kubernetes uses the chart's probes): liveness on EDGE_PROXY__HEALTH_PORT when set (outside the
# client connection limit), else on the bind port (8080 unless EDGE_PROXY__BIND or BIND moves it; either set in the
# config file alone needs its own HEALTHCHECK), never through an http_proxy.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD ["python3", "-c", "import os, urllib.request as u; port = os.environ.get('EDGE_PROXY__HEALTH_PORT') or (os.environ.get('EDGE_PROXY__BIND') or os.environ.get('BIND') or ':8080').rpartition(':')[2]; u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/_liveness', timeout=2)"]
# Exec form: edge-proxy is PID 1 and gets SIGTERM itself (its drain), and reaps its own worker processes.
ENTRYPOINT ["edge-proxy"]
CMD ["serve", "--config", "/etc/edge-proxy/config.yaml"]
