"""The `torch` backend of the ReLU rules and pooling: eager torch ops on any device."""
