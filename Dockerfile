# kine-server serving etcd v3 on 0.0.0.0:2379 and /metrics, /health, /readyz on 0.0.0.0:8080,
# its SQLite database on the /db volume, as uid:gid 10001:10001 (chown a bind mount to that).
#
# Debian 12 with Debian's own Python 3.11 (security fixes through Debian's archive: a rebuild
# picks them up). Not python:3.11-slim: that base is Debian 12 plus a second, hand-built Python,
# and no registry is reachable from the CI that builds and runs this image
# (tests/test_image.py), so a stand-in for it would test some other Python; this base's
# stand-in (debootstrap --variant=minbase bookworm) is the same release, the same packages.
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 kine \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin kine \
    && mkdir /db && chown 10001:10001 /db && chmod 0700 /db

# A virtualenv: Debian's Python refuses pip installs into itself (PEP 668), rightly. Behind a
# TLS-intercepting proxy, give pip that proxy's CA bundle as a build secret, which is mounted for
# this step only and never stored in the image:
#   podman build --secret id=pip-cert,src=/etc/ssl/certs/ca-certificates.crt ...
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && python3 -m venv /opt/kine-server \
    && /opt/kine-server/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && rm -rf /app/build
ENV PATH=/opt/kine-server/bin:$PATH

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
