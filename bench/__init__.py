"""Benchmarks: speed and accuracy of declump against peers (see README, Performance)."""
