"""Maintenance: alarms.py (etcd's alarms), quota.py (--quota-backend-bytes and NOSPACE),
restore.py (snapshots into an empty store), kine_import.py (a K3s kine database into one)."""
