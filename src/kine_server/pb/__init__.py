"""Generated protobuf/gRPC code lives here; regenerate with scripts/gen_protos.sh."""
