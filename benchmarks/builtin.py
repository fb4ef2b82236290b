"""The built-in metrics; importing this module registers them."""

from benchmarks import edits, fid, recon, throughput

__all__ = ["edits", "fid", "recon", "throughput"]
