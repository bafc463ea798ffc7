"""The repository contract: what export writes and the server reads (manifest, graph I/O names, n-gram files); numpy and the standard library only."""
