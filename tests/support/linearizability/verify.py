"""Every check of a recorded history, in the order the evidence needs them."""

from __future__ import annotations

from dataclasses import dataclass

from tests.support.linearizability import checker, guarantees, watches
from tests.support.linearizability.guarantees import Findings
from tests.support.linearizability.history import History
from tests.support.linearizability.resolve import Resolution, resolve


@dataclass
class Verification:
    findings: Findings
    resolution: Resolution
    result: checker.Result

    @property
    def ok(self) -> bool:
        """Only a found linearization with no violation passes: UNKNOWN fails too."""
        return not self.findings.violations and self.result.verdict is checker.Verdict.OK

    def report(self) -> str:
        r = self.resolution
        return "\n".join(
            [
                self.result.report(),
                f"indeterminate: {r.took_effect} took effect, {r.dropped} dropped, "
                f"{r.open} left open",
                self.findings.report(),
            ]
        )


def verify(history: History, timeout: float = 30.0, dense: bool = True) -> Verification:
    """Watch checks first: a watch from the first revision that passes them is the complete
    write sequence that resolve uses. Then the revision guarantees and the search, on the
    resolved operations. `timeout` caps the search (UNKNOWN past it)."""
    found = Findings()
    complete = None
    for log in history.watches:
        of_log = watches.check_log(log, history.operations, history.final_revision, dense)
        found.merge(of_log)
        if (
            dense
            and complete is None
            and not of_log.violations
            and log.start_revision <= watches.FIRST_WRITE
            and history.final_revision
        ):
            complete = log
    found.merge(watches.agree(history.watches))
    resolution = resolve(history.operations, complete)
    found.merge(guarantees.check(resolution.operations))
    result = checker.check(resolution.operations, timeout)
    return Verification(found, resolution, result)
