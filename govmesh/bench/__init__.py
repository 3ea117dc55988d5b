"""Benchmarks behind ``govmesh bench``; each measures its baseline in the same run."""
