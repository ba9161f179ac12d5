"""mora_dist: distributed continual pretraining with high-rank parameter-efficient adapters."""

__version__ = "0.1.0"
