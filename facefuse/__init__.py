"""Face fusion served by Triton: the importable logic behind the model repository."""

__version__ = "0.1.0"
