"""The `demucs` command's files, pinned: bit-identical to those recorded before a refactor.

`tests/data/cli_checksums.json` holds the sha256 of every file the command wrote (format and
exact samples), for a set of
calls covering the paths of the separation engine (single model, transformer, bag, shifts, jobs,
two stems, no split) and the wav/flac writers. Checksums depend on the CPU's floating-point
kernels, so they are stored per machine fingerprint (torch version, CPU vendor and family, its
ISA level and the kernel caps set in the environment, see `machine_fingerprint`); on a kind not
recorded yet the test is skipped with that reason (the golden-vector tests, which do not depend on
the CPU, still check the numbers of the engine underneath). Recorded so far: Intel Xeon Sapphire
Rapids (AMX), AMD EPYC Zen 4 (AVX512_BF16), and the latter capped to AVX2
(`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`).

Record (only when the outputs are meant to change, or on a new machine, from the commit before
a change):  .venv/bin/python -m tests.test_separate_reference
"""
from hashlib import sha256
import json
import os
from pathlib import Path
import platform
import random
import typing as tp

import numpy as np
import pytest
import soundfile
import torch
import yaml

from demucs.htdemucs import HTDemucs
from demucs.precision import cpu_fields, cpu_isa
from demucs.pretrained import SOURCES, demucs_unittest
from demucs.separate import main
from demucs.states import serialize_model

CHECKSUMS = Path(__file__).parent / "data" / "cli_checksums.json"
SAMPLERATE = 44100
LENGTH = int(3.3 * SAMPLERATE)

CALLS: tp.Dict[str, tp.List[str]] = {
    "hdemucs_wav16": ["-n", "tiny"],
    "htdemucs_flac_shifts": ["-n", "transformer", "--flac", "--shifts", "2", "--overlap", "0.4"],
    "bag_int24_jobs": ["-n", "bag", "--int24", "-j", "2"],
    "two_stems_float32": ["-n", "tiny", "--two-stems", "vocals", "--float32"],
    "minus_clamp": ["-n", "transformer", "--two-stems", "drums", "--other-method", "minus",
                    "--clip-mode", "clamp", "--shifts", "0"],
    "no_split_float32": ["-n", "tiny", "--no-split", "--float32", "--shifts", "0"],
}


CPU_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine_fingerprint() -> str:
    """What the floating-point results depend on: torch's version, the CPU's vendor and family
    (MKL dispatches on them), the best ISA it reports, ATen's kernel level, and any cap put on
    ATen, oneDNN or MKL from the environment (as when emulating an AVX2 CPU on a newer one)."""
    fields = cpu_fields()
    vendor = fields.get("vendor_id", platform.processor() or platform.machine())
    caps = "".join(f", {name}={os.environ[name].upper()}" for name in CPU_CAPS
                   if name in os.environ)
    return (f"torch {torch.__version__} on {vendor} family {fields.get('cpu family', '?')} "
            f"({cpu_isa()}, ATen {torch.backends.cpu.get_cpu_capability()}{caps})")


def make_repo(root: Path) -> Path:
    """Seeded tiny models and a bag of both, in a local model repository."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(serialize_model(demucs_unittest(), {}), root / "tiny.th")
    torch.save(serialize_model(HTDemucs(SOURCES, channels=4, depth=2, t_layers=1, t_heads=1,
                                        segment=1, dconv_mode=0), {}), root / "transformer.th")
    bag = {"models": ["tiny", "transformer"], "weights": [[1, 2, 1, 1], [1, 1, 3, 1]]}
    (root / "bag.yaml").write_text(yaml.safe_dump(bag))
    return root


def make_track(path: Path) -> Path:
    rng = np.random.default_rng(0)
    time = np.arange(LENGTH) / SAMPLERATE
    wav = (0.5 * np.sin(2 * np.pi * 220 * time)[:, None] * np.array([1.0, 0.6])
           + 0.3 * np.sin(2 * np.pi * 3.1 * time)[:, None] * rng.standard_normal((LENGTH, 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wav.astype(np.float32), SAMPLERATE, subtype="FLOAT")
    return path


def run_calls(root: Path) -> tp.Dict[str, tp.Dict[str, str]]:
    """Run every call of CALLS; the sha256 of each written file, by call and relative path."""
    repo = make_repo(root / "repo")
    track = make_track(root / "in" / "song.wav")
    result = {}
    for name, flags in CALLS.items():
        out = root / "out" / name
        random.seed(0)
        main([*flags, "--repo", str(repo), "-o", str(out), "-d", "cpu", str(track)])
        result[name] = {str(path.relative_to(out)): audio_checksum(path)
                        for path in sorted(out.rglob("*")) if path.is_file()}
    return result


def audio_checksum(path: Path) -> str:
    """sha256 of a written file's format and exact samples (its bytes, but for a float wav's
    PEAK chunk, which libsndfile stamps with the time of writing)."""
    info = soundfile.info(str(path))
    dtype = {"PCM_16": "int16", "PCM_24": "int32", "FLOAT": "float32"}[info.subtype]
    samples, _ = soundfile.read(str(path), dtype=dtype, always_2d=True)
    header = f"{info.format} {info.subtype} {info.samplerate} {info.channels} {info.frames}"
    return sha256(header.encode() + samples.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def recorded() -> tp.Dict[str, tp.Dict[str, str]]:
    fingerprint = machine_fingerprint()
    table = json.loads(CHECKSUMS.read_text())
    if fingerprint not in table:
        pytest.skip(f"CLI checksums were recorded for {sorted(table)}, not for {fingerprint}: "
                    "record them from a commit whose outputs are trusted with "
                    "`.venv/bin/python -m tests.test_separate_reference`")
    return table[fingerprint]


def test_fingerprint_tells_an_emulated_cpu_from_a_real_one(monkeypatch):
    """A CPU capped to AVX2 from the environment must not claim a real AVX2 CPU's checksums."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # ATen's level is read only once
    native = machine_fingerprint()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert machine_fingerprint() != native
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in machine_fingerprint()


def test_cli_outputs_are_bit_identical_to_the_recorded_ones(recorded, tmp_path):
    torch.set_num_threads(1)
    assert run_calls(tmp_path) == recorded


if __name__ == "__main__":
    import tempfile
    torch.set_num_threads(1)
    table = json.loads(CHECKSUMS.read_text()) if CHECKSUMS.exists() else {}
    with tempfile.TemporaryDirectory() as folder:
        table[machine_fingerprint()] = run_calls(Path(folder))
    CHECKSUMS.parent.mkdir(exist_ok=True)
    CHECKSUMS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"recorded {machine_fingerprint()} in {CHECKSUMS}")
