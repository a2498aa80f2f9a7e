"""Demucs: music source separation (time-domain, hybrid and hybrid transformer models)."""
from .allocator import tune_malloc

__version__ = "4.1.0"

tune_malloc()
