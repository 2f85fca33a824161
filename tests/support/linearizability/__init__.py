"""Linearizability of kine-server, checked on recorded histories (as etcd's robustness suite does
with Porcupine).

- history: what a recorded operation and a watch event are, and a history's JSON form.
- model: etcd's KV for one key, as a step function of the checker.
- checker: the Wing-Gong/Lowe search (Porcupine's), per-key partitions, memoised, time-capped.
- guarantees: etcd's revision guarantees, checked over the whole history.
- watches: watch streams deliver every write exactly once, in revision order.
- resolve: what the evidence says about operations whose outcome the client never heard.
- recorder: concurrent clients and watchers against a live server.
"""
