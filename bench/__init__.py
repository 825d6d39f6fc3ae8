"""frmap.bench: every benchmark, run by `frmap bench` and by the pytest-benchmark files beside
them (`pytest bench --benchmark-only`). Speed is quoted as a ratio against the reference measured
in the same run, beside the machine it ran on."""
