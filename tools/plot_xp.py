"""`python3 -m tools.plot_xp SIG [SIG ...]`: curves of one or several XPs in one PNG.

One panel per metric (by default the train and valid loss and the valid nSDR, plus the test nSDR
and SI-SDR when the XPs were tested), one line per XP, labelled with its signature and the
overrides that differ between the XPs (as `dora grid` names them). The labels, wrapped, go in a
legend of their own below the panels, which keep the full width of the figure however long the
overrides are. Run it from the repository root, as `dora`; it reads each XP's `history.json`
and needs matplotlib (`pip install ".[train]"`).
"""
import argparse
import logging
from pathlib import Path
import sys
import textwrap
import typing as tp

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("train.loss", "valid.loss", "valid.nsdr", "test.nsdr", "test.si_sdr")
FIGURE_WIDTH = 9.  # inches
PANEL_HEIGHT = 3.  # inches, per metric
LABEL_WIDTH = 100  # characters of a legend line before it wraps
LEGEND_LINE = 0.19  # inches per legend line at the "small" font size (8 pt), with spacing


class PlotError(Exception):
    """The XPs cannot be plotted (unknown signature, no epoch yet, no such metric)."""


def labels(deltas: tp.Dict[str, tp.Sequence[tp.Tuple[str, tp.Any]]]) -> tp.Dict[str, str]:
    """`{sig: "sig key=value ..."}` with the overrides not shared by every XP (all of them for a
    single XP)."""
    as_sets = {sig: {f"{key}={value}" for key, value in delta} for sig, delta in deltas.items()}
    common = set.intersection(*as_sets.values()) if len(as_sets) > 1 else set()
    return {sig: " ".join([sig] + [f"{key}={value}" for key, value in delta
                                   if f"{key}={value}" not in common])
            for sig, delta in deltas.items()}


def curve(history: tp.List[dict], metric: str) -> tp.Tuple[tp.List[int], tp.List[float]]:
    """Epochs (1-based) and values of `stage.name` in `history`, where present."""
    stage, name = metric.split(".", 1)
    points = [(epoch + 1, metrics[stage][name]) for epoch, metrics in enumerate(history)
              if name in metrics.get(stage, {})]
    return [epoch for epoch, _ in points], [value for _, value in points]


def load_histories(sigs: tp.Sequence[str]) -> tp.Tuple[tp.Dict[str, list], tp.Dict[str, str]]:
    """Histories and labels of the XPs `sigs` (from the Dora folder of the current one)."""
    from demucs.train import main
    histories, deltas = {}, {}
    for sig in sigs:
        try:
            xp = main.get_xp_from_sig(sig)
        except RuntimeError as error:
            raise PlotError(f"{error}: run from the repository root, where `dora run` made "
                            "outputs/xps/") from None
        history = main.get_xp_history(xp)
        if not history:
            raise PlotError(f"XP {sig} has no finished epoch yet ({xp.folder}/history.json)")
        histories[sig], deltas[sig] = history, xp.delta or []
    return histories, labels(deltas)


def wrapped(label: str, width: int = LABEL_WIDTH) -> str:
    """`label` on lines of at most `width` characters, broken between overrides (inside one only
    when it is longer than a line, e.g. a long path), continuation lines indented."""
    return "\n".join(textwrap.wrap(label, width, subsequent_indent="    ",
                                   break_on_hyphens=False)) or label


def _supported_formats() -> tp.Set[str]:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase
    return set(FigureCanvasBase.get_supported_filetypes())


def check_output(out: Path) -> None:
    """Refuse, before any work, an output that is a folder or whose extension matplotlib cannot
    write."""
    if out.is_dir():
        raise PlotError(f"-o {out} is a folder: give a file name, e.g. {out / 'curves.png'}")
    suffix = out.suffix.lstrip(".").lower()
    formats = _supported_formats()
    if suffix not in formats:
        what = f"cannot write a .{suffix} image" if suffix else "has no extension"
        raise PlotError(f"-o {out}: {what}; end the name with one of "
                        f".{', .'.join(sorted(formats))} (e.g. .png)")


def figure_of(histories: tp.Dict[str, list], names: tp.Dict[str, str],
              metrics: tp.Sequence[str]) -> tp.Any:
    """The matplotlib figure: one panel per metric that some XP has, one line per XP, and the
    XPs' labels in a legend axis below the panels (its last axis), as tall as their wrapped
    lines need."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator
    present = [metric for metric in metrics
               if any(curve(history, metric)[0] for history in histories.values())]
    if not present:
        raise PlotError(f"none of the metrics {', '.join(metrics)} is in these XPs' histories")
    labels = {sig: wrapped(names[sig]) for sig in histories}
    lines = sum(label.count("\n") + 1 for label in labels.values())
    legend_height = LEGEND_LINE * lines + 0.3
    figure = pyplot.figure(figsize=(FIGURE_WIDTH, PANEL_HEIGHT * len(present) + legend_height),
                           layout="constrained")
    grid = figure.add_gridspec(len(present) + 1, 1,
                               height_ratios=[PANEL_HEIGHT] * len(present) + [legend_height])
    axes = []
    for row, metric in enumerate(present):
        axis = figure.add_subplot(grid[row, 0], sharex=axes[0] if axes else None)
        for sig, history in histories.items():
            epochs, values = curve(history, metric)
            if epochs:
                axis.plot(epochs, values, marker="o" if len(epochs) < 20 else None,
                          label=labels[sig], color=f"C{list(histories).index(sig) % 10}")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if row < len(present) - 1:
            axis.tick_params(labelbottom=False)
        axes.append(axis)
    last = max(max(curve(history, metric)[0], default=1) for history in histories.values()
               for metric in present)
    axes[0].set_xlim(0.5, last + 0.5)  # whole epochs, also for a single one
    axes[-1].set_xlabel("epoch")
    legend_axis = figure.add_subplot(grid[-1, 0])
    legend_axis.axis("off")
    handles = [pyplot.Line2D([], [], color=f"C{index % 10}", marker="o")
               for index in range(len(histories))]
    legend_axis.legend(handles, [labels[sig] for sig in histories], loc="upper left",
                       fontsize="small", frameon=False, borderaxespad=0.)
    return figure


def plot(histories: tp.Dict[str, list], names: tp.Dict[str, str], metrics: tp.Sequence[str],
         out: Path) -> Path:
    """Write the image `out` of `figure_of(histories, names, metrics)`."""
    from matplotlib import pyplot
    figure = figure_of(histories, names, metrics)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100)
    except OSError as error:
        raise PlotError(f"cannot write {out}: {error.strerror or error}") from None
    finally:
        pyplot.close(figure)
    return out


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.plot_xp", description=__doc__.splitlines()[0])
    parser.add_argument("sigs", nargs="+", metavar="SIG", help="signatures of the XPs to plot")
    parser.add_argument("-o", "--out", type=Path,
                        help="image to write, .png (or .pdf, .svg, ...) (default: "
                             "plots/SIG[_SIG...].png in Dora's folder, outputs/)")
    parser.add_argument("-m", "--metrics", nargs="+", default=list(DEFAULT_METRICS),
                        help="STAGE.NAME of history.json, e.g. valid.nsdr_vocals "
                             f"(default: {' '.join(DEFAULT_METRICS)})")
    return parser


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bad = [metric for metric in args.metrics if "." not in metric]
    if bad:
        get_parser().error(f"metrics are STAGE.NAME (e.g. valid.loss), got {', '.join(bad)}")
    sigs = list(dict.fromkeys(args.sigs))  # each XP once, in the order given
    if len(sigs) < len(args.sigs):
        logger.warning("tools.plot_xp: each XP is drawn once (%s given more than once)",
                       ", ".join(sorted({sig for sig in args.sigs if args.sigs.count(sig) > 1})))
    try:
        if args.out is not None:
            check_output(args.out)
        histories, names = load_histories(sigs)
        from demucs.train import main as train_main
        out = args.out or Path(train_main.dora.dir) / "plots" / ("_".join(sigs) + ".png")
        plot(histories, names, args.metrics, out)
    except PlotError as error:
        logger.error("tools.plot_xp: %s", error)
        sys.exit(1)
    logger.info("Curves of %s written to %s", ", ".join(sigs), out)


if __name__ == "__main__":
    main()
