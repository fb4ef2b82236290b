"""The zoo benchmark harness: one module per metric, registered under ``zoo.metrics``."""
