"""`python3 -m tools.plot_xp SIG [SIG ...]`: curves of one or several XPs in one PNG.

One panel per metric (by default the train and valid loss and the valid nSDR, plus the test nSDR
and SI-SDR when the XPs were tested), one line per XP, labelled with its signature and the
overrides that differ between the XPs (as `dora grid` names them). Run it from the repository
root, as `dora`; it reads each XP's `history.json` and needs matplotlib (`pip install ".[train]"`).
"""
import argparse
import logging
from pathlib import Path
import sys
import typing as tp

logger = logging.getLogger(__name__)

DEFAULT_METRICS = ("train.loss", "valid.loss", "valid.nsdr", "test.nsdr", "test.si_sdr")


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


def plot(histories: tp.Dict[str, list], names: tp.Dict[str, str], metrics: tp.Sequence[str],
         out: Path) -> Path:
    """Write the PNG `out`: one panel per metric that some XP has, one line per XP."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    present = [metric for metric in metrics
               if any(curve(history, metric)[0] for history in histories.values())]
    if not present:
        raise PlotError(f"none of the metrics {', '.join(metrics)} is in these XPs' histories")
    figure, axes = pyplot.subplots(len(present), 1, figsize=(8, 3 * len(present)),
                                   squeeze=False, sharex=True)
    for axis, metric in zip(axes[:, 0], present):
        for sig, history in histories.items():
            epochs, values = curve(history, metric)
            if epochs:
                axis.plot(epochs, values, marker="o" if len(epochs) < 20 else None,
                          label=names[sig])
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("epoch")
    axes[0, 0].legend(fontsize="small")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    pyplot.close(figure)
    return out


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.plot_xp", description=__doc__.splitlines()[0])
    parser.add_argument("sigs", nargs="+", metavar="SIG", help="signatures of the XPs to plot")
    parser.add_argument("-o", "--out", type=Path,
                        help="PNG to write (default: plots/SIG[_SIG...].png in Dora's folder, "
                             "outputs/)")
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
    try:
        histories, names = load_histories(args.sigs)
        from demucs.train import main as train_main
        out = args.out or Path(train_main.dora.dir) / "plots" / ("_".join(args.sigs) + ".png")
        plot(histories, names, args.metrics, out)
    except PlotError as error:
        logger.error("tools.plot_xp: %s", error)
        sys.exit(1)
    logger.info("Curves of %s written to %s", ", ".join(args.sigs), out)


if __name__ == "__main__":
    main()
