"""The runner DVC stages call: ``python -m pipelines.run EXPERIMENT``."""
