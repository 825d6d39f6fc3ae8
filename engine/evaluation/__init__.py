"""How well the detectors work: metrics, the detection study, the detector comparison, and their
tables and figures."""
