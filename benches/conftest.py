"""Benchmarks compare svq with a peer measured in the same run and report ratios; no
absolute time is asserted (the machines are noisy)."""
