"""Helpers that start real external servers (PostgreSQL, etcd) for the test suite."""
