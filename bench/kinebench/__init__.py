"""The benchmark behind `bench/run.py`: kine-server against a real etcd (see bench/README.md).

Modules, in the order a run uses them: `cli` (flags, the run from start to end), `servers`
(starting and stopping etcd, kine-server and PostgreSQL), `procs` (CPU and memory from /proc),
`clients` (the worker processes that run `loadgen` jobs, and measuring a window of them),
`workloads` (one module per workload), `report` (collecting figures, the table, the JSON).
"""
