# The gateway as a container image.
#
#   docker build -t gateway .
#   docker run -p 8000:8000 -e GATEWAY_ROUTERS=http://router:8000 -e GATEWAY_REPLICAS=a=http://r1:8000 gateway
#   docker run -p 8000:8000 gateway up          # embedded local stack: mock vLLM replicas + router + gateway
#
# Every `gateway serve` flag has an env var (GATEWAY_*, see `gateway serve --help`).
# SIGTERM drains streams in flight for up to GATEWAY_DRAIN_TIMEOUT_S (default 30 s): give
# `docker stop -t 35` / terminationGracePeriodSeconds >= that, or lower the drain timeout.

# ---- builder: wheels for the project and every dependency, then a venv from them ----
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# A C compiler for the stream pump (gateway/dataplane/_pump.c); only this stage has it.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first, from pyproject.toml alone, so that a code change reuses this layer.
# The otel extra is in: GATEWAY_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) turns traces on.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['otel']))" > requirements.txt \
 && python -m pip wheel --wheel-dir /wheels -r requirements.txt

COPY README.md setup.py ./
COPY gateway ./gateway
COPY router_client ./router_client
COPY replicas ./replicas
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-index --find-links /wheels 'gateway[otel]' \
 && /opt/venv/bin/python -c "import gateway.dataplane._pump" \
 && /opt/venv/bin/python -m pip uninstall --quiet -y pip setuptools

# ---- final: the venv only; no compilers, no build tools, no wheels, no pip cache ----
FROM python:3.11-slim

LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="Async gateway in front of vLLM replicas (replaces HAProxy+Lua)"

RUN groupadd --gid 10001 gateway \
 && useradd --no-log-init --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000

# /-/healthz is the gateway's own liveness (200 even when no replica is reachable).
# No curl in slim images: python's urllib; any non-2xx or connection error exits non-zero.
# The admin port when one is set (plain HTTP, no client certificate needed), else the public port
# (HTTPS when GATEWAY_TLS_CERT is set; the certificate names the public host, so it is not verified here).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, ssl, urllib.request; e = os.environ.get; admin = e('GATEWAY_ADMIN_PORT', '0') not in ('', '0'); tls = bool(e('GATEWAY_TLS_CERT')) and not admin; urllib.request.urlopen('%s://127.0.0.1:%s/-/healthz' % ('https' if tls else 'http', e('GATEWAY_ADMIN_PORT') if admin else e('GATEWAY_PORT', '8000')), timeout=2, context=ssl._create_unverified_context() if tls else None)" || exit 1

# Exec form: the gateway is PID 1 and gets SIGTERM itself, so `docker stop` drains.
ENTRYPOINT ["gateway"]
CMD ["serve"]
