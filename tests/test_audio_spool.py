"""The spool: float audio appended in blocks to a temporary file and read back exactly."""
import torch

from demucs.audio_spool import AudioSpool


def test_spool_round_trip():
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(3, length, generator=generator) for length in (5, 0, 70_000, 3)]
    whole = torch.cat(blocks, dim=-1)
    with AudioSpool(3) as spool:
        for block in blocks:
            spool.append(block)
        assert spool.length == whole.shape[-1]
        assert torch.equal(spool.read(0, spool.length), whole)
        assert torch.equal(spool.read(65_000, 65_010), whole[:, 65_000:65_010])
        assert torch.equal(spool.read(70_000, 80_000), whole[:, 70_000:])  # past the end
        assert spool.read(10, 10).shape == (3, 0)
        parts = list(spool.blocks(frames=30_000))
        assert [part.shape[-1] for part in parts] == [30_000, 30_000, 10_008]
        assert torch.equal(torch.cat(parts, dim=-1), whole)
