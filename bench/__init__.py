"""bench package (see docs/architecture.md §4; docs/benchmarks.md)."""
