"""Generated gRPC stubs for sinkserve.v1 (from protos/; do not edit, run `make proto`)."""
