# The syncd service image: slim, non-root, `syncd run` (scheduler + HTTP side), the
# embedded store under /app/state as a volume.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncd ./syncd
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# Inside a container the HTTP side must listen beyond loopback for the port mapping and
# the orchestrator's probes; outside one it stays on 127.0.0.1 (the config's default).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 SYNCD_CONFIG=/app/config.toml \
    SYNCD_SERVER__HOST=0.0.0.0 SYNCD_SERVER__PORT=8787
RUN useradd --system --create-home --home-dir /app --uid 10001 syncd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
RUN mkdir -p /app/state && chown syncd /app/state
USER syncd
VOLUME ["/app/state"]
EXPOSE 8787
# The port is reachable beyond loopback here: give /status, /metrics and /readyz a token,
#   docker run -e SYNCD_SERVER__TOKEN="$(openssl rand -hex 32)" …
# (scrapers then send "Authorization: Bearer <token>"; /healthz and webhooks need none).
# Without it anyone who reaches the port can make the service read its store on demand.
# /healthz answers while the process serves; the slim image has no curl, Python does it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SYNCD_SERVER__PORT', '8787'), timeout=4)"
ENTRYPOINT ["syncd"]
CMD ["run"]
