"""demucs.audio, the entry point: every name it gathers is the very object of the module that
does the job, so code written against Demucs 4.1's `demucs.audio` runs unchanged on the split."""
import importlib
import json
from pathlib import Path

import pytest

from demucs import audio

HOMES = {
    "audio_conversion": ["CLIP_MODES", "as_dtype_pcm", "check_finite", "convert_audio",
                         "convert_audio_channels", "f32_pcm", "i16_pcm", "prevent_clip",
                         "resample"],
    "audio_decoders": ["AudioReadError"],
    "audio_encoding": ["SAVE_SUFFIXES", "AudioFormat", "AudioWriter", "encode_ffmpeg",
                       "encode_mp3", "encode_wav", "mp3_round_trip", "save_audio"],
    "audio_file": ["AudioFile", "read_audio"],
    "audio_spool": ["BLOCK_FRAMES", "AudioSpool", "DecodedAudio"],
    "files": ["PathLike"],
    "mp3_header": ["MP3_BITRATES", "MP3_SAMPLERATES"],
    "utils": ["temp_filenames"],
}
REFERENCE = Path(__file__).parent / "data" / "public_names_4_1_0.json"


@pytest.mark.parametrize("module", sorted(HOMES))
def test_gathered_names_are_the_objects_of_their_home_module(module):
    home = importlib.import_module(f"demucs.{module}")
    for name in HOMES[module]:
        assert getattr(audio, name) is getattr(home, name), name


def test_all_lists_the_gathered_names_and_every_name_of_4_1():
    gathered = sorted(name for names in HOMES.values() for name in names)
    assert sorted(audio.__all__) == gathered
    of_4_1 = json.loads(REFERENCE.read_text())["demucs.audio"]
    assert set(of_4_1) <= set(audio.__all__)
