# The gigafactory image: the CLI, coordinator and factory (compose/docker-compose.yml builds it).
#
#   docker build -t gigafactory .                              # engines: shell (and noop)
#   docker build -t gigafactory --build-arg AGENT_CLIS=1 .     # + Node.js and the pinned agent CLIs
#
# AGENT_CLIS=1 installs Node.js and npm from Debian (Node >= 20 is needed: Debian 13, the base
# of python:3.11-slim since 2025) and runs scripts/install-agent-clis, which pins the versions
# the engine tests were proven against. A factory offers an engine only when its probe finds
# the CLI and its credentials (pass API keys through the factory's environment).
FROM python:3.11-slim

ARG AGENT_CLIS=0

# git: a repo job's mirror, worktree, commit and fenced push. tini as PID 1: forwards SIGTERM
# to gigafactory (a factory drains on it) and reaps whatever an engine's children leave behind.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini ca-certificates \
    && if [ "$AGENT_CLIS" = "1" ]; then apt-get install -y --no-install-recommends nodejs npm; fi \
    && rm -rf /var/lib/apt/lists/*

# The package only (.dockerignore keeps virtualenvs, tests and git history out of the context).
WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir /src

# Outside any home folder, so every user of the image finds them (gigafactory.agent_clis).
ENV GIGAFACTORY_AGENT_CLIS=/opt/gigafactory/agent-clis
RUN if [ "$AGENT_CLIS" = "1" ]; then scripts/install-agent-clis; fi

# Not root: an engine runs what a job asks for. GIGAFACTORY_HOME holds a factory's outbox,
# quarantine, logs and workspace (/var/lib/gigafactory/factories/<id>).
RUN useradd --create-home --uid 10001 gigafactory \
    && mkdir -p /var/lib/gigafactory && chown gigafactory /var/lib/gigafactory
ENV GIGAFACTORY_HOME=/var/lib/gigafactory
USER gigafactory
WORKDIR /var/lib/gigafactory

ENTRYPOINT ["tini", "--"]
CMD ["gigafactory", "--help"]
