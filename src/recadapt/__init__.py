"""recadapt: adapt large language models to recommendation, personalized per user."""

__version__ = "0.1.0"
