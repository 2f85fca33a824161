"""A tiny Kubernetes REST client over HTTPS with a static bearer token, and the paths and
bodies of the configmaps the checks (and the benchmark's apiserver load) write."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from typing import Any

from .outcome import CheckFailed


class Api:
    """One keep-alive HTTPS connection per thread: many threads are many connections, as
    kube-apiserver's clients keep them."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.ctx = ssl.create_default_context()
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE  # the apiserver's self-signed serving cert
        self.local = threading.local()

    def connection(self, timeout: float | None = 60.0) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.ctx, timeout=timeout
        )

    def headers(self, content_type: str | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if content_type:
            h["Content-Type"] = content_type
        return h

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            conn = getattr(self.local, "conn", None)
            reused = conn is not None
            if conn is None:
                conn = self.local.conn = self.connection()
            try:
                headers = self.headers(content_type if data is not None else None)
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self.local.conn = None
                if attempt or not reused:  # only a stale keep-alive connection is retried
                    raise
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                raise
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def expect(self, status: int, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        got, obj = self.request(method, path, body, **kw)
        if got != status:
            raise CheckFailed(f"{method} {path}: HTTP {got} (expected {status}): {brief(obj)}")
        return obj

    def close(self) -> None:
        """This thread's connection (others close when their threads' locals go)."""
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None


def brief(obj: Any) -> str:
    if isinstance(obj, dict) and obj.get("kind") == "Status":
        return f"{obj.get('reason')}: {obj.get('message')}"
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return text[:300]


def cm_body(
    name: str, data: dict[str, str], labels: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def cms(ns: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{ns}/configmaps" + (f"/{name}" if name else "")
