"""The live dashboard (``kappa dashboard``): a read-only web view of results, DLQ, lag and replays.

``sources`` reads S3 (live results, counters, reports, the CURRENT pointer), ``dlq`` follows the
dead-letter topic, ``collector`` assembles one snapshot per view, ``app`` serves it as JSON and as a
server-sent-events stream, and ``static/`` holds the page with the vendored uPlot chart library.
"""
