"""Measurements run from a checkout (``python -m benchmarks.lab.speed``), not shipped in the
wheel: they time the project against peers and need its source tree, not a user's install."""
