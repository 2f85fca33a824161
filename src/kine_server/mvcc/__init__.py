"""etcd's mvcc: revisions and the key space, the one writer, and the watch algorithm.

applier.py (Range/Put/DeleteRange/Txn as etcd applies them), writer.py (group commit: the one
owner of the revision counter), kvstore.py (reads), hub.py (committed events to subscribers),
watcher_group.py, watcher.py and watchable.py (which watches an event concerns, what each must
send, and how a lagging one catches up), history.py (history pages), poller.py (other
instances' commits), compactor.py (history removed in batches, on its own task).
"""
