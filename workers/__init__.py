"""kappa-dagster runtime: long-running Kafka workers and the code they share.

This package never imports Dagster; ``kappa_dagster`` orchestrates it.
"""
