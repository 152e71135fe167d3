"""The demo mesh, and the process helpers it shares with the benchmarks and tests."""
