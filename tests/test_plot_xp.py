"""tools.plot_xp: the curves PNG of one or several XPs."""
import json
import logging
from pathlib import Path

import pytest

from tests.training_helpers import registered_xp
from tools import plot_xp

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_xp(argv, epochs: int) -> str:
    """An XP folder as `dora run` leaves it after `epochs` epochs, with made-up metrics."""
    xp = registered_xp(argv)
    folder = Path(xp.folder)
    history = [{"train": {"loss": 1 / (epoch + 1)},
                "valid": {"loss": 1.2 / (epoch + 1), "nsdr": float(epoch)}}
               for epoch in range(epochs)]
    history[-1]["test"] = {"nsdr": 2.5, "si_sdr": 2.0}
    (folder / "history.json").write_text(json.dumps(history))
    return xp.sig


def test_two_xps_in_one_png(dora_dir, caplog):
    first = _fake_xp(["dset=toy", "optim.lr=1e-3", "seed=1"], 3)
    second = _fake_xp(["dset=toy", "optim.lr=1e-4", "seed=1"], 5)
    with caplog.at_level(logging.INFO):
        plot_xp.main([first, second])
    out = dora_dir / "plots" / f"{first}_{second}.png"
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000
    assert f"written to {out}" in caplog.text


def test_labels_keep_the_differing_overrides():
    names = plot_xp.labels({"aaa": [("dset", "toy"), ("optim.lr", 0.001)],
                            "bbb": [("dset", "toy"), ("optim.lr", 0.0001)]})
    assert names == {"aaa": "aaa optim.lr=0.001", "bbb": "bbb optim.lr=0.0001"}
    assert plot_xp.labels({"aaa": [("dset", "toy")]}) == {"aaa": "aaa dset=toy"}


def test_curve_skips_epochs_without_the_metric():
    history = [{"valid": {"nsdr": 1.0}}, {"valid": {"nsdr": 2.0}, "test": {"nsdr": 3.0}}]
    assert plot_xp.curve(history, "test.nsdr") == ([2], [3.0])
    assert plot_xp.curve(history, "valid.nsdr") == ([1, 2], [1.0, 2.0])


def test_errors_name_the_problem(dora_dir, caplog, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        plot_xp.main(["deadbeef"])
    assert exit_.value.code == 1 and "Could not find experiment with signature deadbeef" in \
        caplog.text
    sig = _fake_xp(["dset=toy"], 2)
    with pytest.raises(SystemExit):
        plot_xp.main([sig, "-m", "valid.nope", "-o", str(tmp_path / "x.png")])
    assert "none of the metrics valid.nope" in caplog.text and not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit) as exit_:
        plot_xp.main([sig, "-m", "loss"])
    assert exit_.value.code == 2
