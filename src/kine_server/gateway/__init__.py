"""etcd's HTTP/JSON gateway (`--listen-gateway-urls`): for clients that do not speak gRPC."""
