"""Benchmarks of Demucs.

    python3 -m tools.bench --train [--batch-sizes 1 2] [--steps 3] [--device cpu|cuda] [--json OUT]

`--train` measures training steps per second and peak memory for the released `htdemucs`
configuration (XP 955717e8 of the `mmi` grid): forward, l1 loss, backward and Adam step on
random stems as long as the real training examples (`dset.segment` after the repitch crop and the
shift augmentation: 7.8 s). Each batch size runs in a fresh process, so that the peak resident
memory (CPU) or the peak allocated memory (CUDA) belongs to that configuration only.

Other modes (e.g. separation speed) plug in as further `--<mode>` flags with their own
`bench_<mode>` function.
"""
import argparse
import json
import logging
import multiprocessing as mp
import resource
import sys
import time
import typing as tp

import torch

logger = logging.getLogger(__name__)

RELEASED_HTDEMUCS_SIG = "955717e8"


def released_htdemucs_config():
    """Config of the released htdemucs XP, from the `mmi` grid definition."""
    from demucs.grids.mmi import HTDEMUCS
    from demucs.train import main
    xp = main.get_xp(main.value_to_argv(HTDEMUCS))
    if xp.sig != RELEASED_HTDEMUCS_SIG:
        logger.warning("grid config has signature %s, not the released %s", xp.sig,
                       RELEASED_HTDEMUCS_SIG)
    return xp.cfg


def training_length(cfg) -> int:
    """Samples per training example as the model sees it: the dataset segment, cropped by the
    repitch augmentation (by its largest tempo change) and then by the random shift."""
    samplerate = cfg.dset.samplerate
    length = int(cfg.dset.segment * samplerate)
    if cfg.augment.repitch.proba:
        length = int((1 - cfg.augment.repitch.max_tempo / 100) * length)
    return length - int(cfg.dset.shift * samplerate)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2 ** 20


def run_train_steps(batch_size: int, steps: int, warmup: int, device_name: str) -> dict:
    """Time `steps` training steps (after `warmup` untimed ones) of the released htdemucs."""
    from demucs.train import get_model, get_optimizer
    device = torch.device(device_name)
    cfg = released_htdemucs_config()
    torch.manual_seed(0)
    model = get_model(cfg).to(device)
    model.train()
    optimizer = get_optimizer(model, cfg)
    length = training_length(cfg)
    shape = (batch_size, len(model.sources), model.audio_channels, length)
    sources = 0.1 * torch.randn(*shape, device=device)
    mix = sources.sum(dim=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for step in range(warmup + steps):
        _sync(device)
        begin = time.perf_counter()
        estimate = model(mix)
        loss = (estimate - sources).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _sync(device)
        if step >= warmup:
            durations.append(time.perf_counter() - begin)
    return {
        "batch_size": batch_size,
        "seconds_of_audio": length / cfg.dset.samplerate,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "steps_per_s": len(durations) / sum(durations),
        "step_s": sum(durations) / len(durations),
        "peak_memory_mb": _peak_memory_mb(device),
        "device": device_name if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
    }


def _child(queue, *args) -> None:
    try:
        queue.put(run_train_steps(*args))
    except Exception as error:  # reported by the parent
        queue.put({"error": f"{type(error).__name__}: {error}"})


def bench_train(batch_sizes: tp.Sequence[int], steps: int, warmup: int,
                device: str) -> tp.List[dict]:
    """Run `run_train_steps` for each batch size in its own process."""
    context = mp.get_context("spawn")
    results = []
    for batch_size in batch_sizes:
        queue = context.SimpleQueue()
        process = context.Process(target=_child, args=(queue, batch_size, steps, warmup, device))
        process.start()
        process.join()
        result = queue.get() if not queue.empty() else {"error": f"exit code {process.exitcode}"}
        if "error" in result:
            raise RuntimeError(f"training benchmark at batch size {batch_size} failed: "
                               f"{result['error']}")
        results.append(result)
    return results


def format_train(results: tp.Sequence[dict]) -> str:
    """A small table of the training benchmark."""
    lines = [f"Training benchmark, released htdemucs ({RELEASED_HTDEMUCS_SIG}), "
             f"{results[0]['params_m']:.1f} M params, {results[0]['seconds_of_audio']:.2f} s "
             f"examples, device {results[0]['device']} ({results[0]['threads']} threads)",
             f"{'batch':>5} {'steps/s':>9} {'s/step':>8} {'peak MB':>9}"]
    for res in results:
        lines.append(f"{res['batch_size']:>5} {res['steps_per_s']:>9.3f} {res['step_s']:>8.2f} "
                     f"{res['peak_memory_mb']:>9.0f}")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.bench", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true",
                      help="training steps/s and peak memory of the released htdemucs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = get_parser().parse_args(argv)
    if args.train:
        results = bench_train(args.batch_sizes, args.steps, args.warmup, args.device)
        print(format_train(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
