"""End to end: a real kube-apiserver on kine-server (the `e2e/run.py` entry point runs `cli`).

Modules, from the bottom up: `outcome` (PASS/FAIL counting, the one error a check raises, log
tails), `processes` (server processes with a log, kine-server, loopback ports), `apiserver`
(finding, configuring and starting kube-apiserver, waiting for /readyz: the benchmark starts
its apiservers with this module too), `rest` (a tiny Kubernetes REST client), `watching` (a
configmap watch that re-watches), `context` (what one database's checks share), the checks
(`basics`, `crud`, `listing`, `restart`, `compaction`, `logs`), `suite` (one database from
start to shutdown) and `cli` (flags, every database in turn, the exit code).

Standard library only (and the repository's tests/support/postgres.py for PostgreSQL).
"""
