# The syncd service image: slim, non-root, the store under /app/state as a volume.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncd ./syncd
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 SYNCD_CONFIG=/app/config.toml
RUN useradd --system --create-home --home-dir /app --uid 10001 syncd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
RUN mkdir -p /app/state && chown syncd /app/state
USER syncd
VOLUME ["/app/state"]
ENTRYPOINT ["syncd"]
CMD ["sync"]
