"""torch.hub entry point: `torch.hub.load('<owner>/demucs', 'get_model', name='htdemucs')`."""
dependencies = ["dora-search", "julius", "lameenc", "pyyaml", "torch", "tqdm"]

from demucs.pretrained import get_model  # noqa: E402,F401
