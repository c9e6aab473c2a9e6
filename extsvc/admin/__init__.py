"""extsvc's own gRPC APIs: code generated from proto/ by scripts/protos (committed; a test
keeps it current)."""
