"""What the checks of one database share: the run's settings, the servers under test, and
what earlier checks found that later ones need (an early resourceVersion, the bulk configmaps,
when the apiserver recovered from the kine-server restart)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .apiserver import KubeApiserver
from .outcome import Results, check
from .processes import Kine
from .rest import Api

EVENT_TTL_S = 20
COMPACTION_INTERVAL_S = 30
N_NAMESPACES = 20
N_CONFIGMAPS = 1000
WORKERS = 16
BULK_LABEL = "e2e-bulk"

APISERVER_FLAGS = (
    f"--event-ttl={EVENT_TTL_S}s",
    f"--etcd-compaction-interval={COMPACTION_INTERVAL_S}s",
    "--vmodule=compact=4",  # logs "etcd: compacted rev (N)" each time its compactor runs
)
"""The e2e's own apiserver flags: events that expire soon, compaction every 30 s."""


@dataclass
class Context:
    db: str
    results: Results
    kine: Kine
    apiserver: KubeApiserver
    restart_window: tuple[int, int] | None = None
    """Byte offsets of the apiserver log written during the kine-server restart."""
    early_rv: int = 0
    early_exact_ok: str = ""
    recovered_at: float = 0.0
    """When the apiserver wrote again after the kine-server restart."""
    event_created: float = 0.0
    namespaces: list[str] = field(default_factory=list)
    bulk: dict[str, str] = field(default_factory=dict)
    """"ns/name" -> uid of the bulk-created configmaps."""

    @property
    def api(self) -> Api:
        return self.apiserver.api

    @contextmanager
    def check(self, name: str) -> Iterator[list[str]]:
        """A check of this database, named `<db>/<name>` (see outcome.check)."""
        with check(self.results, f"{self.db}/{name}") as note:
            yield note
