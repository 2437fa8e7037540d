# The bot, installed from a wheel (not editable, no source tree in the image), as a non-root user.
# Build from the repository root: docker build -t pizza-bot .

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bot ./bot
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000
# Dependencies first, in their own layer: rebuilt only when requirements.txt changes.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels /tmp/requirements.txt \
    && groupadd --system --gid 10001 bot \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/bot --shell /usr/sbin/nologin bot
USER 10001:10001
# No source tree here: `python -m bot` imports the installed package.
WORKDIR /home/bot
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/healthz\", timeout=4)"]
# Migrations are a separate step (Fly's release_command, compose's migrate service, or MIGRATE_ON_START).
CMD ["python", "-m", "bot", "serve"]
