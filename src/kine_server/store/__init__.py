"""The MVCC store: revisions, Txn evaluation, the single writer, event fan-out and compaction."""
