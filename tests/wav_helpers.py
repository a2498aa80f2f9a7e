"""Multi-stem track folders written for the tests of the dataset modules."""
from pathlib import Path

import numpy as np
import soundfile
import torch

from demucs.wav_tracks import MIXTURE

SOURCES = ["drums", "bass", "other", "vocals"]
SR = 8000


def write_track(folder: Path, sources=SOURCES, samplerate=SR, seconds=2.0, channels=2, seed=0,
                mixture=True):
    """Write random stems (and their sum as mixture) into `folder`; return {name: [C, T] array}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    length = int(seconds * samplerate)
    stems = {source: (0.1 * rng.standard_normal((length, channels))).astype(np.float32)
             for source in sources}
    if mixture:
        stems[MIXTURE] = sum(stems[source] for source in sources)
    for name, data in stems.items():
        soundfile.write(str(folder / f"{name}.wav"), data, samplerate, subtype="FLOAT")
    return {name: torch.from_numpy(data.T.copy()) for name, data in stems.items()}
