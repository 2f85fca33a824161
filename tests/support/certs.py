"""Test certificates made with the openssl command line: a CA, a server and client certificates."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str) -> Pair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(pair.key),
        "-out",
        str(pair.cert),
        cwd=directory,
    )
    return pair


def issue(ca: Pair, directory: Path, name: str, server: bool, client_too: bool = False) -> Pair:
    """A certificate signed by `ca`; server ones are valid for 127.0.0.1 and localhost, and
    with `client_too` for client authentication as well (as kubeadm issues etcd's)."""
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    if server and client_too:
        usage = "serverAuth, clientAuth"
    lines = [f"extendedKeyUsage = {usage}"]
    if server:
        lines.append("subjectAltName = IP:127.0.0.1, DNS:localhost")
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        str(pair.key),
        "-out",
        str(csr),
        cwd=directory,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca.cert),
        "-CAkey",
        str(ca.key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(pair.cert),
        cwd=directory,
    )
    return pair
