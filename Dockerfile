# Editable install: Alembic reads alembic.ini and migrations/ beside the code.
# Spacebell: applies migrations, then serves API, discovery and dispatcher (set SPACEBELL_* at run time).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SPACEBELL_API_HOST=0.0.0.0 SPACEBELL_API_PORT=8000 \
    SPACEBELL_DATABASE_URL=sqlite+aiosqlite:////data/spacebell.db

WORKDIR /srv/spacebell
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN pip install -e . \
    && useradd --system --uid 10001 --home-dir /srv/spacebell spacebell \
    && mkdir -p /data && chown spacebell /data

USER spacebell
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"

# `spacebell db upgrade` first so a failed migration stops the container before it serves.
CMD ["sh", "-c", "spacebell db upgrade && exec spacebell serve"]
