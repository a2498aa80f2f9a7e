"""Legacy module path: early Hybrid Demucs checkpoints pickled `demucs.wdemucs.WDemucs`."""
from .hdemucs import HDemucs

WDemucs = HDemucs
