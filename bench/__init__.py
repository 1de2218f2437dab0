"""courier's benchmarks: courier against the peers a user would otherwise pick, side by side.

``python -m bench`` (``make bench``; ``--quick`` for ``make bench-quick``) starts every server
it needs on 127.0.0.1 through the test kit (``courier_testkit``), writes a JSON report to ``bench/results/``
and PNG plots, and prints the numbers. Benchmarks record numbers; they never fail on timing.
"""
