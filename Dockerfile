# kine-server serving etcd v3 on 0.0.0.0:2379, its SQLite database on the /db volume.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . && useradd --system --uid 10001 kine && mkdir /db && chown kine /db

USER kine
VOLUME ["/db"]
EXPOSE 2379
ENV KINE_ENDPOINT=sqlite:///db/state.db \
    KINE_LISTEN_ADDRESS=0.0.0.0:2379
ENTRYPOINT ["kine-server"]
