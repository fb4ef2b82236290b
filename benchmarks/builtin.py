"""The built-in metrics; importing this module registers them."""

from benchmarks import disentangle, edits, fid, fidelity, leakage, recon, throughput

__all__ = ["disentangle", "edits", "fid", "fidelity", "leakage", "recon", "throughput"]
