"""The process model: one process, or a writer process and `--workers` front-end processes.

                clients (the kernel spreads connections: SO_REUSEPORT on one port)
          +----------------+-----------------+
    front-end 1      front-end 2   ...  front-end N     gRPC, validation, reads, watches
          | commands (link.py)  ^ results, commit feed (channel.py), frames.py
          +----------> writer process <----+            group commit, compaction, leases,
                            |                           quota, /metrics and /health
                         database

run.py (the entry points), single.py (everything in one process), writer.py and
supervisor.py (the writer process and its front-ends), frontend.py (a front-end process),
serving.py (the gRPC server of a process that serves clients), parts.py (the store each kind
of process is built around), startup.py (checks and listeners, one line if anything fails).
"""
