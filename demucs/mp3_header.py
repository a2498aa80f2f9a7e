"""The gapless header of an mp3 file: a silent first frame holding a Xing "Info" tag and a LAME
tag (with its CRC-16) that record the encoder delay and the end padding.

With it ffmpeg, mpg123 (soundfile) and most players decode exactly the samples that were encoded,
instead of about 1,600 more. Only plain constant bit rate MPEG-1 Layer III streams get one.
Pure byte handling: the encoders (`demucs.audio_encoding`) call `lame_info_frame` and
`info_frame_of_file`.
"""
import logging
import mmap
import os
import struct
import typing as tp

logger = logging.getLogger(__name__)

# MPEG-1 Layer III constants, for the gapless "Info"/LAME tag written by `encode_mp3`.
_MP3_BITRATES_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MP3_SAMPLERATE_INDEX = {44100: 0, 48000: 1, 32000: 2}
# What an MPEG-1 Layer III stream can hold: sample rates (Hz) and constant bitrates (kbps); lame
# silently picks another bitrate for any other value.
MP3_SAMPLERATES = tuple(sorted(_MP3_SAMPLERATE_INDEX))
MP3_BITRATES = _MP3_BITRATES_KBPS[1:]
_MP3_FRAME_SAMPLES = 1152
_LAME_ENCODER_DELAY = 576
_XING_FLAGS = 0x0F  # frame count, byte count, table of contents and quality fields present.


def _mp3_stream_frames(data: bytes, samplerate: int) -> tp.Optional[tp.Tuple[int, int]]:
    """(frame count, first frame header) when `data` is an MPEG-1 Layer III stream without CRC at
    `samplerate`, else None (e.g. lame resampled a low bit rate to MPEG-2)."""
    expected_rate = _MP3_SAMPLERATE_INDEX.get(samplerate)
    position, frames, first_header = 0, 0, None
    while position + 4 <= len(data):
        header = int.from_bytes(data[position:position + 4], "big")
        is_mpeg1_layer3 = header >> 17 == 0x7FFD and header >> 16 & 1
        bitrate_index = header >> 12 & 15
        if (not is_mpeg1_layer3 or header >> 10 & 3 != expected_rate
                or bitrate_index in (0, 15)):
            return None
        bitrate = _MP3_BITRATES_KBPS[bitrate_index] * 1000
        position += 144 * bitrate // samplerate + (header >> 9 & 1)
        frames += 1
        first_header = first_header or header
    if position != len(data) or first_header is None:
        return None
    return frames, first_header


def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (reflected polynomial 0xA001), the checksum of the LAME tag."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def lame_info_frame(data: bytes, samplerate: int, samples: int) -> bytes:
    """A silent first frame holding a Xing "Info" and LAME tag for the CBR stream `data`.

    It records the encoder delay and the end padding, so that ffmpeg, mpg123 (soundfile) and most
    players decode exactly `samples` samples per channel instead of about 1,600 more. Returns
    b"" when the stream is not a plain MPEG-1 Layer III one.
    """
    described = _mp3_stream_frames(data, samplerate)
    if described is None:
        logger.debug("mp3 stream is not MPEG-1 Layer III at %d Hz: no gapless tag", samplerate)
        return b""
    frames, header = described
    header &= ~(1 << 9)  # no padding byte: the frame length is then exact.
    bitrate = _MP3_BITRATES_KBPS[header >> 12 & 15] * 1000
    frame = bytearray(144 * bitrate // samplerate)
    side_info = 17 if header >> 6 & 3 == 3 else 32
    total_bytes = len(frame) + len(data)
    padding = frames * _MP3_FRAME_SAMPLES - _LAME_ENCODER_DELAY - samples
    xing = (b"Info" + struct.pack(">III", _XING_FLAGS, frames, total_bytes)
            + bytes(i * 256 // 100 for i in range(100)) + struct.pack(">I", 0))
    lame = (b"LAME3.100" + bytes([1, 0]) + struct.pack(">IHH", 0, 0, 0)
            + bytes([0, min(bitrate // 1000, 255)])
            + (_LAME_ENCODER_DELAY << 12 | padding).to_bytes(3, "big")
            + struct.pack(">BBHIH", 0, 0, 0, total_bytes, 0))
    body = struct.pack(">I", header) + bytes(side_info) + xing + lame
    if not 0 <= padding < 4096 or len(body) + 2 > len(frame):
        return b""
    frame[:len(body)] = body
    frame[len(body):len(body) + 2] = struct.pack(">H", crc16_arc(bytes(body)))
    return bytes(frame)


def info_frame_of_file(stream: tp.BinaryIO, samplerate: int, samples: int) -> bytes:
    """`lame_info_frame` for the mp3 stream held in the file `stream`, read through mmap."""
    if stream.seek(0, os.SEEK_END) == 0:
        return b""
    with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return lame_info_frame(data, samplerate, samples)
