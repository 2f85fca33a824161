# kine-server serving etcd v3 on 0.0.0.0:2379 and /metrics, /health, /readyz on 0.0.0.0:8080,
# its SQLite database on the /db volume, as uid:gid 10001:10001 (chown a bind mount to that).
#
# The base is pinned to an exact Python release and Debian release, so a rebuild gets the same
# ones. (No digest: none could be checked against the registry from where this was written, and
# a wrong one fails every build; add the one `docker pull` prints when you can.)
FROM python:3.11.14-slim-bookworm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10001 kine \
    && useradd --system --uid 10001 --gid 10001 --no-create-home kine \
    && mkdir /db && chown 10001:10001 /db && chmod 0700 /db

# Numeric, so that Kubernetes' runAsNonRoot can check it without a passwd file.
USER 10001:10001
VOLUME ["/db"]
EXPOSE 2379 8080
# The metrics listener on every interface of the container, as the gRPC one: it is reachable
# from outside only when published (-p 8080:8080); KINE_METRICS_BIND_ADDRESS=127.0.0.1:8080
# keeps it inside. SIGTERM gives requests 8 s, the database 1 s more: within docker stop's 10 s.
ENV KINE_ENDPOINT=sqlite:///db/state.db \
    KINE_LISTEN_ADDRESS=0.0.0.0:2379 \
    KINE_METRICS_BIND_ADDRESS=0.0.0.0:8080 \
    KINE_SHUTDOWN_GRACE=8s
STOPSIGNAL SIGTERM
# No curl in the image: the probe is Python's standard library, reading the same KINE_*
# settings (TLS included) as the server. Give those as environment, not as flags, for it to see.
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
    CMD ["python", "-m", "kine_server.healthcheck", "/health"]
ENTRYPOINT ["kine-server"]
