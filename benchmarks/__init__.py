"""User-facing benchmarks: packing efficiency, throughput, formats, streaming."""
