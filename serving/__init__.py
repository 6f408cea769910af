"""tandem's generation server: Dynamic SplitFuse over a paged KV cache, served over gRPC."""
