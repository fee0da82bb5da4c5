"""What the suites share: services (databases, vhosts, Redis databases) made and dropped per
test, waiting on conditions with deadlines derived from progress, the worker harness, the
reference model of the counters, and the real clients' environments (AIECS)."""
