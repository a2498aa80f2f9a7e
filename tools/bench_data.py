"""Benchmark the training data pipeline: examples per second of the loader plus augmentations.

Builds the training set exactly as `dora run` does (`demucs.train.get_datasets` on the composed
Hydra config, so repitch is included with its configured probability) on the toy MusDB
(generated at `data/toy_musdb` when missing), then times `--batches` batches through a DataLoader
and the configured augmentations, once per `--workers` value:

    python3 -m tools.bench_data [--workers 0 2] [--batch-size 4] [--segment 4] [OVERRIDE ...]
"""
import argparse
import logging
from pathlib import Path
import time
import typing as tp

import torch
from torch.utils.data import DataLoader

from demucs import augment

logger = logging.getLogger("bench_data")
CONF = Path(__file__).resolve().parent.parent / "conf"
TOY_MUSDB = Path("data/toy_musdb")


def load_config(overrides: tp.List[str]):
    """The training configuration (`conf/config.yaml`) with Hydra `overrides`."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base="1.1"):
        return compose(config_name="config", overrides=overrides)


def _endless(loader: DataLoader) -> tp.Iterator[torch.Tensor]:
    """Batches of `loader`, epoch after epoch."""
    while True:
        yield from loader


def examples_per_second(dataset, pipeline: torch.nn.Module, batch_size: int, workers: int,
                        batches: int) -> tp.Tuple[float, float]:
    """(steady examples/s after the first batch, seconds to the first batch)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers)
    batches_iter = _endless(loader)
    begin = time.perf_counter()
    pipeline(next(batches_iter))
    first = time.perf_counter()
    count = 0
    for _ in range(batches):
        sources = next(batches_iter)
        pipeline(sources).sum(dim=1)  # the training mixture
        count += sources.shape[0]
    return count / (time.perf_counter() - first), first - begin


def ensure_toy_musdb(path: Path) -> Path:
    if not (path / "train").is_dir():
        from demucs.toy_musdb import generate
        logger.info("Generating the toy MusDB at %s", path)
        generate(path)
    return path


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.bench_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--musdb", type=Path, default=TOY_MUSDB,
                        help="MusDB-like dataset (default: the toy set, generated if missing)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader num_workers values to compare")
    parser.add_argument("--batch-size", type=int, default=4, help="multiple of remix group 4")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--segment", type=float, default=4., help="dset.segment, seconds")
    parser.add_argument("--repitch", type=float, default=None,
                        help="augment.repitch.proba (default: the config's)")
    parser.add_argument("--metadata", type=Path, default=Path("metadata"))
    parser.add_argument("overrides", nargs="*", default=[],
                        help="more Hydra overrides, e.g. augment.codec.proba=0.5")
    return parser


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    opts = get_parser().parse_args(argv)
    torch.set_num_threads(1)
    musdb = ensure_toy_musdb(opts.musdb).resolve()
    overrides = [f"dset.musdb={musdb}", f"dset.segment={opts.segment}",
                 f"dset.metadata={opts.metadata.resolve()}"]
    if opts.repitch is not None:
        overrides.append(f"augment.repitch.proba={opts.repitch}")
    overrides += opts.overrides
    args = load_config(overrides)
    from demucs.train import get_datasets
    train_set, _ = get_datasets(args)
    pipeline = augment.augmentation_from_config(args).train()
    logger.info("%d training examples of %.1f s, batch %d, repitch proba %.2f",
                len(train_set), opts.segment, opts.batch_size, args.augment.repitch.proba)
    for workers in opts.workers:
        torch.manual_seed(0)
        rate, startup = examples_per_second(train_set, pipeline, opts.batch_size, workers,
                                            opts.batches)
        logger.info("num_workers=%d: %.1f examples/s (first batch after %.2f s)",
                    workers, rate, startup)


if __name__ == "__main__":
    main()
