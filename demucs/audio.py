"""Audio input and output without torchaudio: every decode, encode and block-wise stream.

This module is the entry point: it gathers the public names of the modules below, one job each,
under the names Demucs 4.1 has here.

- `demucs.audio_file`: `AudioFile` and `read_audio`. Reading goes through ffprobe/ffmpeg (any
  format and container ffmpeg knows, several streams, seeking, resampling on the fly) and falls
  back to soundfile when ffmpeg is not installed or cannot decode the file
  (`demucs.audio_decoders`). Every read problem (missing, empty, truncated, not audio, no
  channels) is reported as one `AudioReadError` whose message names the file.
- `demucs.audio_spool`: long tracks are handled block by block so that memory does not grow with
  their duration. `AudioFile.decode_to_spool` decodes a stream once into a `DecodedAudio` (float32
  samples in an anonymous temporary file).
- `demucs.audio_conversion`: channels, resampling, clipping, PCM sample types.
- `demucs.audio_encoding`: soundfile writes `.wav`/`.flac` and lameenc `.mp3`; `AudioWriter`
  accumulates blocks in a spool before encoding them, and `save_audio` (one tensor), the `demucs`
  command and `demucs.api` all encode through the same writers, through
  `demucs.files.atomic_write`, so that a failure never leaves a partial output file.
- `demucs.mp3_header`: mp3 files start with a gapless Info/LAME frame so that decoders give back
  exactly the samples written.
"""
from .audio_conversion import (CLIP_MODES, as_dtype_pcm, check_finite, convert_audio,
                               convert_audio_channels, f32_pcm, i16_pcm, prevent_clip, resample)
from .audio_decoders import AudioReadError
from .audio_encoding import (SAVE_SUFFIXES, AudioFormat, AudioWriter, encode_ffmpeg, encode_mp3,
                             encode_wav, mp3_round_trip, save_audio)
from .audio_file import AudioFile, read_audio
from .audio_spool import BLOCK_FRAMES, AudioSpool, DecodedAudio
from .files import PathLike
from .mp3_header import MP3_BITRATES, MP3_SAMPLERATES
from .utils import temp_filenames  # (a name of Demucs 4.1's audio module)

__all__ = [
    "AudioFile", "AudioFormat", "AudioReadError", "AudioSpool", "AudioWriter", "BLOCK_FRAMES",
    "CLIP_MODES", "DecodedAudio", "MP3_BITRATES", "MP3_SAMPLERATES", "PathLike", "SAVE_SUFFIXES",
    "as_dtype_pcm", "check_finite", "convert_audio", "convert_audio_channels", "encode_ffmpeg",
    "encode_mp3", "encode_wav", "f32_pcm", "i16_pcm", "mp3_round_trip", "prevent_clip",
    "read_audio", "resample", "save_audio", "temp_filenames",
]
