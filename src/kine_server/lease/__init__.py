"""etcd's leases, kept in the database: granted, renewed, revoked and expired through the writer."""
