"""asv benchmarks for fastbn (see bn.py)."""
