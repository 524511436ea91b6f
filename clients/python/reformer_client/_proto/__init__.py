"""Generated gRPC stubs for protos/reformer/v1 (do not edit; run scripts/gen_protos.py)."""
