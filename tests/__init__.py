"""kine-server's test suite."""
