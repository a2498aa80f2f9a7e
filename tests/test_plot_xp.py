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


SIX = ["dset.musdb=/home/someone/datasets/my_own_songs_in_the_musdb_layout/version_2",
       "dset.sources=[drums,bass,guitar,piano,other,vocals]", "weights=[1,1,1,1,1,1]",
       "dset.valid_tracks=2", "htdemucs.channels=8", "optim.lr=1e-3"]
FOUR = ["dset.musdb=/home/someone/datasets/another_folder_of_songs/version_3",
        "dset.sources=[drums,bass,other,vocals]", "weights=[1,1,1,2]", "dset.valid_tracks=3",
        "htdemucs.channels=16", "optim.lr=1e-4"]


def test_long_labels_leave_the_panels_their_width(dora_dir, tmp_path):
    """Issue 30: long override legends squeezed every panel into a narrow strip and were cut.
    The labels are wrapped into a legend axis below the panels: in the saved figure every panel
    spans most of the width, the legend lies below the lowest panel and inside the figure."""
    from matplotlib import image, pyplot
    first = _fake_xp(["model=htdemucs", *SIX], 3)
    second = _fake_xp(["model=htdemucs", *FOUR], 4)
    histories, names = plot_xp.load_histories([first, second])
    assert min(map(len, names.values())) > 1.5 * plot_xp.LABEL_WIDTH  # the case of the issue
    figure = plot_xp.figure_of(histories, names, plot_xp.DEFAULT_METRICS)
    out = tmp_path / "curves.png"
    figure.savefig(out, dpi=100)  # lays the figure out
    *panels, legend_axis = figure.axes
    assert len(panels) == 5
    for panel in panels:
        box = panel.get_position()
        assert box.width > 0.8 and box.height > 0.1, box  # fractions of the figure
    assert legend_axis.get_position().y1 <= min(panel.get_position().y0 for panel in panels)
    renderer = figure.canvas.get_renderer()
    legend = legend_axis.get_legend().get_window_extent(renderer)
    assert legend.x0 >= 0 and legend.y0 >= 0
    assert legend.x1 <= figure.bbox.width and legend.y1 <= figure.bbox.height
    texts = [text.get_text() for text in legend_axis.get_legend().get_texts()]
    assert [text.replace("\n    ", " ") for text in texts] == [names[first], names[second]]
    assert max(len(line) for text in texts for line in text.splitlines()) <= \
        plot_xp.LABEL_WIDTH
    height, width = image.imread(out).shape[:2]
    assert (width, height) == (round(figure.bbox.width), round(figure.bbox.height))
    pyplot.close(figure)


def test_output_misuse_is_refused_before_any_work(dora_dir, tmp_path, caplog, monkeypatch):
    sig = _fake_xp(["dset=toy"], 2)
    monkeypatch.setattr(plot_xp, "load_histories", lambda sigs: pytest.fail("did some work"))
    for out, message in [(tmp_path / "curves.xyz", "cannot write a .xyz image; end the name "
                                                   "with one of"),
                         (tmp_path / "curves", "has no extension"),
                         (tmp_path, "is a folder: give a file name")]:
        with pytest.raises(SystemExit) as exit_:
            plot_xp.main([sig, "-o", str(out)])
        assert exit_.value.code == 1 and f"tools.plot_xp: -o {out}" in caplog.text
        assert message in caplog.text
        caplog.clear()


def test_unwritable_output_is_one_line(dora_dir, tmp_path, caplog):
    sig = _fake_xp(["dset=toy"], 2)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        plot_xp.main([sig, "-o", str(blocker / "curves.png")])
    assert exit_.value.code == 1
    assert f"tools.plot_xp: cannot write {blocker / 'curves.png'}: " in caplog.text


def test_an_xp_given_twice_is_drawn_once(dora_dir, caplog):
    sig = _fake_xp(["dset=toy"], 2)
    plot_xp.main([sig, sig])
    assert "each XP is drawn once" in caplog.text
    assert (dora_dir / "plots" / f"{sig}.png").exists()
