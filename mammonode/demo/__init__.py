"""``mammonode demo`` (run.py) and its props: a synthetic phantom exam (phantom.py) and
loopback helpers shared with the tests and benchmarks (loopback.py)."""
