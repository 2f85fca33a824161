"""etcd's auth: permissions.py (the state and the checks every call makes), changes.py (the Auth
calls that change it), store.py (this process's view of it), tokens.py (simple and JWT tokens)."""
