"""frmap.bench: every benchmark, with one harness.

Each `frmap bench <target>` module owns its cases, the correctness check it asserts before
timing, and the calls it times; `run` times them (best of a few repeats), quotes every speed as
a ratio against the reference measured in the same run, records the machine, and returns the
JSON that `frmap bench --json` writes and the docs' tables are rendered from. The
pytest-benchmark files beside them (`bench_<op>.py`, `pytest bench --benchmark-only`) import
those same cases, checks and calls and only hand them to pytest-benchmark, for its statistics
and its comparison of saved runs: a case or a check changes in one place. They were not folded
into `frmap bench` because pytest-benchmark's saved-run comparison (`--benchmark-compare`) is
what catches a regression between two commits, which `frmap bench`'s one-run ratios do not.
"""
