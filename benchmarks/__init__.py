"""`make bench`: throughput and memory of kappa-dagster's workers, as ratios to reference tools.

Every figure is a ratio measured side by side in the same run, on the same broker and S3 server,
so a noisy 2-core machine still gives comparable numbers: Kafka's own ``ProducerPerformance`` /
``ConsumerPerformance`` (kafka-tools jar from the stack's jar cache) and Quix Streams.

Run ``python -m benchmarks --help``; see ``benchmarks/README.md`` for findings.
"""
