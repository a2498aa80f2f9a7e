"""tools.bench_finetune: the arms compose as valid configs with the same budget, one process's
cost is its own, the table, and a training step with and without adapters."""
from pathlib import Path
import sys

import pytest
import torch

from tools.bench_finetune import (SIX, Measure, arm_argvs, format_table, lora_step,
                                  run_measured)


@pytest.fixture
def released(tmp_path, monkeypatch) -> Path:
    """A working folder whose release_models/ holds `base.th`, a tiny 4-stem HTDemucs with the
    toy architecture; Dora's XPs go under it."""
    from demucs.htdemucs import HTDemucs
    from demucs.states import serialize_model
    from demucs.train import main
    (tmp_path / "release_models").mkdir()
    torch.manual_seed(0)
    model = HTDemucs(["drums", "bass", "other", "vocals"], channels=8, depth=2, nfft=64,
                     t_layers=1, t_heads=1, samplerate=44100, segment=4)
    torch.save(serialize_model(model, {}), tmp_path / "release_models" / "base.th")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    return tmp_path


def test_every_arm_is_a_valid_config_with_the_same_budget(released):
    from demucs.train import main
    arms = arm_argvs("base", epochs=3, batches=5, lora_rank=8, segment=1.5)
    assert list(arms) == ["scratch", "finetune", "adapters", "frozen encoder"]
    configs = {arm: main.get_xp(argv).cfg for arm, argv in arms.items()}  # checked, model built
    for cfg in configs.values():
        assert (cfg.epochs, cfg.max_batches, list(cfg.dset.sources)) == (3, 5, SIX)
        assert (cfg.dset.segment, cfg.dset.shift, cfg.batch_size) == (1.5, 0.75, 4)
        assert cfg.dset.valid_tracks == 0 and not cfg.test.sdr
    assert configs["scratch"].continue_pretrained is None
    assert dict(configs["finetune"].continue_sources_init) == {"guitar": "other",
                                                               "piano": "other"}
    assert configs["adapters"].lora.rank == 8 and configs["finetune"].lora.rank == 0
    assert list(configs["frozen encoder"].optim.freeze) == ["encoder.*", "tencoder.*"]


def test_a_process_is_measured_alone(tmp_path):
    """This test process holds torch (hundreds of MB), which must not count in a child's peak:
    Linux keeps a process's peak across exec."""
    peaks = {}
    for size in [300, 0]:
        code = f"x = bytearray({size} * 2 ** 20); print('done')"
        measure = run_measured([sys.executable, "-c", code], tmp_path)
        assert measure.output.strip() == "done" and measure.seconds > 0
        peaks[size] = measure.peak_mb
    assert peaks[300] > 300 > peaks[0]
    with pytest.raises(RuntimeError, match="failed"):
        run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path)


def test_table_has_one_line_per_arm_with_each_stem():
    nsdrs = {f"nsdr_{stem}": float(index) for index, stem in enumerate(SIX)}
    nsdrs["nsdr"] = 2.5
    table = format_table({"scratch": ("ab12cd34", Measure(61.2, 812.4, (1.5, 2.25), ""), nsdrs)})
    header, rule, line = table.splitlines()
    assert header.split(" | ")[2:8] == SIX
    assert line == ("| scratch | ab12cd34 | 0.00 | 1.00 | 2.00 | 3.00 | 4.00 | 5.00 | 2.50 | 61 "
                    "| 812 | 1.5 -> 2.2 |")


def test_adapters_train_fewer_weights_in_a_step():
    from demucs.train import main
    from tests.training_helpers import TINY_MODELS
    cfg = main.get_xp(["model=htdemucs", *TINY_MODELS["htdemucs"], "dset.segment=0.2",
                       "dset.shift=0.1"]).cfg
    full, adapted = (lora_step(cfg, rank, batch_size=1, steps=1) for rank in [0, 2])
    assert full["trainable"] == full["total"]
    assert adapted["total"] - adapted["trainable"] == full["total"]  # the adapters train
    assert 0 < adapted["trainable"] < full["total"] / 4
    assert full["step_s"] > 0 and adapted["peak_mb"] > 0
