"""A watch on one namespace's configmaps that survives the apiserver ending its stream: the
events it saw, in order, and every re-watch it needed."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field

from .rest import Api, brief, cms


@dataclass
class Seen:
    type: str
    name: str
    rv: int
    data: dict[str, str]


@dataclass
class Watcher:
    """Watches one namespace's configmaps from a resourceVersion, re-watching from the last
    resourceVersion seen whenever the apiserver ends the stream."""

    api: Api
    namespace: str
    rv: int
    events: list[Seen] = field(default_factory=list)
    reconnects: list[str] = field(default_factory=list)
    fatal: str = ""
    stopping: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    conn: http.client.HTTPSConnection | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="watch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        conn = self.conn
        if conn is not None and conn.sock is not None:
            with suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if self.thread is not None:
            self.thread.join(10)

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(
                lambda: len(self.events) >= count or bool(self.fatal), timeout
            )

    def run(self) -> None:
        failing_since: float | None = None
        while not self.stopping:
            path = f"{cms(self.namespace)}?watch=1&resourceVersion={self.rv}&timeoutSeconds=900"
            try:
                self.conn = self.api.connection(timeout=120)
                self.conn.request("GET", path, headers=self.api.headers())
                resp = self.conn.getresponse()
                if resp.status != 200:
                    body = resp.read().decode(errors="replace")
                    if resp.status == 410:
                        self.fatal = f"re-watch from {self.rv}: HTTP 410: {body[:300]}"
                        return
                    raise OSError(f"HTTP {resp.status}: {body[:200]}")
                failing_since = None
                while True:
                    line = resp.readline()
                    if not line:
                        raise OSError("stream ended")
                    ev = json.loads(line)
                    obj = ev.get("object", {})
                    if ev.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            self.fatal = f"watch from {self.rv}: ERROR event 410: {brief(obj)}"
                            return
                        raise OSError(f"ERROR event: {brief(obj)}")
                    rv = int(obj["metadata"]["resourceVersion"])
                    if ev.get("type") != "BOOKMARK":
                        seen = Seen(ev["type"], obj["metadata"]["name"], rv, obj.get("data") or {})
                        with self.cond:
                            self.events.append(seen)
                            self.cond.notify_all()
                    self.rv = rv
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if self.stopping:
                    return
                self.reconnects.append(f"after rv {self.rv}: {exc}")
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > 180:
                    self.fatal = f"could not re-watch for 180s: {exc}"
                    return
                time.sleep(0.5)
            finally:
                if self.conn is not None:
                    self.conn.close()
