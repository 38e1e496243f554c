# clawbus: one image for every role (`gateway`, `worker`, `up`, `agent`, `config check`).
#
#   docker build -t clawbus .
#   docker run --rm clawbus config check --config /etc/clawbus/clawbus.json5
#
# compose.yaml runs it as two gateways and a scalable `worker` service on a
# 3-node NATS JetStream cluster. Roles are chosen by the command (ENTRYPOINT is
# `clawbus`); healthchecks are defined per service in compose.yaml, since only
# gateways serve HTTP.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs (see .dockerignore): a source change does not
# invalidate more layers than it must.
COPY pyproject.toml README.md ./
COPY bus ./bus
COPY clawbus ./clawbus
COPY gateway ./gateway
COPY workers ./workers
RUN pip install . \
    && rm -rf /src/build /src/*.egg-info \
    && useradd --create-home --uid 10001 --user-group clawbus

USER clawbus
WORKDIR /home/clawbus
# The state dir (embedded NATS data for `clawbus up`; unused with bus.url set).
ENV CLAWBUS_STATE_DIR=/home/clawbus/.clawbus
EXPOSE 18789

ENTRYPOINT ["clawbus"]
CMD ["--help"]
