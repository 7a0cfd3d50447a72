"""Benchmarks: resilient_db against raw SQLAlchemy, measured in the same run.

``python -m benchmarks`` runs every benchmark; ``--smoke`` runs a short version
for CI. Results are ratios, never timed assertions.
"""
