"""Demucs: music source separation (time-domain, hybrid and hybrid transformer models)."""

__version__ = "4.1.0"
