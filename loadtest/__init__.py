"""Load generators and benchmarks (run as modules: python -m loadtest.<name>)."""
