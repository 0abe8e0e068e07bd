"""bpo: online preference optimization in proximity to the behavior LLM (arXiv 2406.12168)."""

__version__ = "0.1.0"
