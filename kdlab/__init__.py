"""kdlab: distil large language models into models that are cheap to serve."""

__version__ = "0.1.0"
