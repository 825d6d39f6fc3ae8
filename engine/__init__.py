"""frmap.engine: feature responses, scores, detectors, attacks, evaluation and the CLI."""
