"""torch.hub entry point: `torch.hub.load('<owner>/demucs', 'get_model', name='htdemucs')`."""
# Module names (torch.hub checks each with importlib): what loading a model imports.
dependencies = ["julius", "lameenc", "numpy", "safetensors", "soundfile", "torch", "tqdm", "yaml"]

from demucs.pretrained import get_model  # noqa: E402,F401
