"""kdq: distill a big image classifier into a small int8 model and certify its exports."""

__version__ = "0.1.0"
