"""kine-server: an etcd v3 API server that keeps its data in SQLite, PostgreSQL or MySQL."""

__version__ = "0.1.0"
