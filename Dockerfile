# syntax=docker/dockerfile:1
#
# One image for every Nexus role; the role is the command:
#
#   docker build -t nexus:local .
#   docker run --rm -p 3000:3000 -e NEXUS_KAFKA_BOOTSTRAP=kafka:9092 nexus:local            # gateway
#   docker run --rm -p 6066:6066 -e NEXUS_KAFKA_BOOTSTRAP=kafka:9092 \
#       -e OLLAMA_HOST=http://ollama:11434 nexus:local worker
#   docker run --rm -p 11434:11434 nexus:local simulate-ollama --host 0.0.0.0 --port 11434
#
# Settings come from NEXUS_<SECTION>_<KEY> environment variables (see
# nexus/settings.py) and OLLAMA_HOST; docker-compose.yml wires up a full stack.

# An exact tag (Python 3.11.14 on Debian 12): a rebuild gets the same interpreter and OS, not whatever
# 3.11-slim points at that day. Update it on purpose.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 nexus \
 && useradd --system --uid 10001 --gid nexus --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin nexus

WORKDIR /app

# Dependencies first, in their own layer: read from pyproject.toml alone, so
# editing the sources does not reinstall them. All of them ship wheels, so the
# slim image needs no compiler. constraints.txt pins them to the versions the
# suite passed with, as `make` and CI install them.
COPY pyproject.toml constraints.txt ./
# The `otel` extra is included, so setting OTEL_EXPORTER_OTLP_ENDPOINT exports traces (docs/observability.md).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['otel']))" \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt -c constraints.txt \
 && rm /tmp/requirements.txt

# Then the project itself (no test extras; .dockerignore keeps .venv, .cache,
# .git, tests and bytecode out of the context). The check after it fails the
# build, not the first request, if the Avro schemas were not packaged into
# site-packages (it runs from / so the sources in /app cannot stand in for them).
# The worker keeps its Faust state in the Nexus home (nexus/home.py), /app/.cache here: writable.
ENV NEXUS_HOME=/app/.cache
COPY . .
RUN pip install --no-cache-dir --no-deps . \
 && cd / \
 && python -c "from schemas import Codec; c = Codec.from_directory(); c.current('InferenceRequest'); c.current('InferenceResponse')" \
 && python -c "from producers.gateway.page import STATIC_DIR; assert (STATIC_DIR / 'index.html').is_file(), STATIC_DIR" \
 && nexus --help > /dev/null \
 && mkdir -p /app/.cache \
 && chown -R nexus:nexus /app/.cache

USER nexus

# 3000: gateway HTTP (NEXUS_GATEWAY_PORT); 6066: worker's Faust web server with /metrics
# (NEXUS_WORKER_WEB_PORT); 8765: the websocket bridge (NEXUS_BRIDGE_PORT).
EXPOSE 3000 6066 8765

ENTRYPOINT ["nexus"]
CMD ["gateway"]
