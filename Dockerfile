# syntax=docker/dockerfile:1
# mfa-gateway container image.
#
#   docker build -t mfa-gateway .
#   docker run -p 8080:8080 -v ./deploy:/etc/mfa-gateway:ro \
#     -e MFAGW_ENCRYPTION_KEY=... -e MFAGW_COOKIE_SECRET=... mfa-gateway
#
# The mounted folder holds gateway.toml, policies/ and the key files. In the container,
# gateway.toml must listen on 0.0.0.0:8080 (the HEALTHCHECK below probes that port).

ARG PYTHON_VERSION=3.11

# --- build: a wheel of the package (nothing of this stage reaches the final image) ---------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime ---------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MFA_GATEWAY_CONFIG=/etc/mfa-gateway/gateway.toml

RUN groupadd --system --gid 10001 mfagw \
 && useradd --system --uid 10001 --gid mfagw --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mfagw \
 && mkdir -p /etc/mfa-gateway \
 && chown root:mfagw /etc/mfa-gateway \
 && chmod 0750 /etc/mfa-gateway

COPY --from=build /wheels /wheels
RUN pip install /wheels/mfa_gateway-*.whl \
 && rm -rf /wheels

# Never run as root: a numeric id so that runAsNonRoot policies can verify it.
USER 10001:10001
WORKDIR /etc/mfa-gateway
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]

# SIGTERM → graceful shutdown (open requests and streams get server.shutdown_timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["mfa-gateway"]
CMD ["run", "--config", "/etc/mfa-gateway/gateway.toml"]
