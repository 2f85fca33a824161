"""TLS and mutual TLS with certificates made at test time, driven by the real etcdctl."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.certs import Pair, issue, make_ca
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Pair]:
    ca = make_ca(tmp_path / "pki", "kine-ca")
    other = make_ca(tmp_path / "pki", "other-ca")
    return {
        "ca": ca,
        "other": other,
        "server": issue(ca, tmp_path / "pki", "server", server=True),
        "client": issue(ca, tmp_path / "pki", "client", server=False),
        "stranger": issue(other, tmp_path / "pki", "stranger", server=False),
    }


def tls_flags(pki: dict[str, Pair], mutual: bool) -> list[str]:
    flags = [
        "--server-cert-file",
        str(pki["server"].cert),
        "--server-key-file",
        str(pki["server"].key),
    ]
    if mutual:
        flags += ["--trusted-ca-file", str(pki["ca"].cert)]
    return flags


def ok(output: str) -> bool:
    return "[exit 0]" in output.splitlines()[0]


def refused(url: str, command: str) -> bool:
    """The call fails (etcdctl retries a refused handshake until its command timeout)."""
    return not ok(etcdctl(url, f"--command-timeout=2s {command}"))


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
    tmp_path: Path, pki: dict[str, Pair]
) -> None:
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path, *tls_flags(pki, mutual=True)) as kine:
        url = f"https://{kine.address}"
        ca, client, stranger = pki["ca"], pki["client"], pki["stranger"]
        good = f"--cacert={ca.cert} --cert={client.cert} --key={client.key}"
        assert ok(etcdctl(url, f"{good} put /secure yes"))
        got = etcdctl(url, f"{good} get /secure")
        assert ok(got) and got.splitlines()[1:3] == ["/secure", "yes"]
        assert ok(etcdctl(url, f"{good} endpoint health"))
        # No client certificate, one from another CA, plain text, or the server not trusted.
        assert refused(url, f"--cacert={ca.cert} get /secure")
        assert refused(
            url, f"--cacert={ca.cert} --cert={stranger.cert} --key={stranger.key} get /x"
        )
        assert refused(f"http://{kine.address}", "get /secure")
        assert refused(
            url, f"--cacert={pki['other'].cert} --cert={client.cert} --key={client.key} get /x"
        )
        members = etcdctl(url, f"{good} member list")
        assert f"https://{kine.address}" in members


def test_server_tls_without_client_certificates(tmp_path: Path, pki: dict[str, Pair]) -> None:
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path, *tls_flags(pki, mutual=False)) as kine:
        url = f"https://{kine.address}"
        assert ok(etcdctl(url, f"--cacert={pki['ca'].cert} put /a 1"))
        assert refused(url, f"--cacert={pki['other'].cert} put /a 1")
        assert refused(f"http://{kine.address}", "put /a 1")


def test_the_first_log_line_says_tls_is_on_with_workers(
    tmp_path: Path, pki: dict[str, Pair]
) -> None:
    """With --workers the writer process, which serves no gRPC itself, writes the first line: it
    said "TLS off" while the front-ends served https. The line names what is served: https, TLS
    on with client certificates, the advertised https URL; and the server does serve https."""
    flags = [*tls_flags(pki, mutual=True), "--workers", "2"]
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path, *flags) as kine:
        url = f"https://{kine.address}"
        good = f"--cacert={pki['ca'].cert} --cert={pki['client'].cert} --key={pki['client'].key}"
        assert ok(etcdctl(url, f"{good} put /secure yes"))
        assert kine.stop() == 0
    first = kine.log().splitlines()[0]
    assert f"serving etcd v3 on {url};" in first, first
    assert "2 workers" in first, first
    assert "TLS on (client certificates required)" in first, first
    assert first.endswith(f"advertising {url}"), first
