"""The gapless mp3 header: its CRC, the frame count and the delay and padding it records, and the
streams it refuses to describe."""
import struct

import lameenc
import numpy as np
import pytest

from demucs.mp3_header import MP3_SAMPLERATES, crc16_arc, lame_info_frame

SIDE_INFO_STEREO = 32
XING_BYTES = 4 + 12 + 100 + 4  # "Info", flags/frames/bytes, table of contents, quality
DELAY_PADDING_AT = 9 + 2 + 8 + 2  # in the LAME tag: version, revision/vbr, gains, flags/bitrate


def lame_stream(samples: int, samplerate: int = 44100, bitrate: int = 128) -> bytes:
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(bitrate)
    encoder.set_in_sample_rate(samplerate)
    encoder.set_channels(2)
    encoder.set_quality(7)
    encoder.silence()
    pcm = (np.random.default_rng(0).uniform(-0.3, 0.3, (samples, 2)) * 32767).astype("<i2")
    return encoder.encode(pcm.tobytes()) + encoder.flush()


def test_crc16_arc_check_value():
    assert crc16_arc(b"123456789") == 0xBB3D  # the catalogued check value of CRC-16/ARC
    assert crc16_arc(b"") == 0


def test_info_frame_records_delay_padding_and_its_crc():
    samples = 10_000
    data = lame_stream(samples)
    frame = lame_info_frame(data, 44100, samples)
    assert frame and int.from_bytes(frame[:4], "big") >> 21 == 0x7FF  # a frame sync
    xing = 4 + SIDE_INFO_STEREO
    assert frame[xing:xing + 4] == b"Info"
    flags, frames, total_bytes = struct.unpack(">III", frame[xing + 4:xing + 16])
    assert total_bytes == len(frame) + len(data)
    lame = xing + XING_BYTES
    assert frame[lame:lame + 9] == b"LAME3.100"
    packed = int.from_bytes(frame[lame + DELAY_PADDING_AT:lame + DELAY_PADDING_AT + 3], "big")
    assert (packed >> 12, packed & 0xFFF) == (576, frames * 1152 - 576 - samples)
    body_end = lame + 34
    assert struct.unpack(">H", frame[body_end:body_end + 2])[0] == crc16_arc(frame[:body_end])


@pytest.mark.parametrize("data, samplerate", [
    (b"not an mp3 stream at all", 44100),
    (lame_stream(5000), 48000),  # frames of another sample rate
    (lame_stream(5000)[:-10], 44100),  # a cut last frame
])
def test_no_frame_for_streams_it_cannot_describe(data, samplerate):
    assert samplerate in MP3_SAMPLERATES
    assert lame_info_frame(data, samplerate, 5000) == b""
