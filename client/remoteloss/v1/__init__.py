"""Generated gRPC stubs for remoteloss.v1; regenerate with scripts/gen_protos.py, never edit."""
