"""gRPC services: each translates and validates etcd requests and hands them to the store."""
