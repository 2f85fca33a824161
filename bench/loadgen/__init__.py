"""The client side of the benchmark: jobs that run inside worker processes.

Every worker process keeps one asyncio event loop and serves jobs sent by the orchestrator
(`kinebench.clients`) over a pipe. A job opens its own connections, does its work and closes
them. Jobs that are measured wait until a `start_at` instant on CLOCK_MONOTONIC (shared by every
process on the machine, so several workers start together) and stop at a count limit or a time
cap, whichever comes first. Each measured job reports the CPU its own process used during the
measured window (`time.process_time`, all threads, gRPC's included), so the orchestrator can say
how busy the client was.

Modules: `worker` (the process's main loop and the job table), `channels` (gRPC connections
and signed-in stubs), `measure` (a job's window, errors, the start barrier), `requests` (the
etcd requests kube-apiserver sends), the gRPC jobs by workload (`loading`, `writes`, `churn`,
`listing`, `watch`) and the jobs through kube-apiserver's REST API (`kube`).
"""
