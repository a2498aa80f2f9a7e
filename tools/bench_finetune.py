"""Evidence for fine-tuning a released model (issue 28), measured on the toy sets with this CPU.

    python3 -m tools.bench_finetune [--out DIR] [--base-epochs 10] [--epochs 4] [--batches 5]
                                    [--segment 2] [--base SIG]
    python3 -m tools.bench_finetune --lora [--lora-rank 8] [--batch-size 1] [--steps 2]

The default run plays the story of docs/training.md "Fine-tune a released model" and compares,
with the same number of batches each (`--epochs` x `--batches`), four ways to get a 6-stem model
of the toy set (drums, bass, guitar, piano, other, vocals):

1. `scratch`: a new model of the same architecture;
2. `finetune`: from a 4-stem model trained on the 4-stem toy set and written by `tools.export`
   (the "released" model), guitar and piano starting from its `other`;
3. `adapters`: the same with `lora.rank` adapters only (on every kind of layer: the output heads
   of the new stems are convolutions);
4. `frozen encoder`: the same with `optim.freeze=[encoder.*,tencoder.*]`.

Each arm is a `dora run` in its own process: its wall time, its peak resident memory (that
process's alone, `tools.child_usage`) and the machine load around it are recorded with its test
nSDR per stem.
DIR gets `results.md` (the table) and `curves.png` (`tools.plot_xp` of the four XPs).

`--lora` measures one training step of the released htdemucs configuration (that of
`tools.bench --train`) with full fine-tuning and with adapters of rank `--lora-rank`, each in its
own process: step time, peak resident memory and trainable weights.
"""
import argparse
from dataclasses import dataclass
import datetime
import json
import os
from pathlib import Path
import resource
import subprocess
import sys
import time
import typing as tp

from tools import child_usage, machine
from tools.figures import commit

ROOT = Path(__file__).resolve().parent.parent
SIX = ["drums", "bass", "guitar", "piano", "other", "vocals"]
NEW_STEMS = ["guitar", "piano"]
ARCHITECTURE = ["model=htdemucs", "htdemucs.channels=8"]


def budget(segment: float) -> tp.List[str]:
    """Smaller batches of shorter excerpts (`segment` seconds) than dset=toy's, no validation (the
    last state is tested) and no museval SDR, so that the whole comparison fits in about 20
    minutes on two idle CPU cores."""
    return ["batch_size=4", f"dset.segment={segment}", f"dset.shift={segment / 2}",
            "dset.valid_tracks=0", "test.sdr=false"]


@dataclass
class Measure:
    """What one process cost: wall seconds, peak resident memory (MB), load before and after."""
    seconds: float
    peak_mb: float
    load: tp.Tuple[float, float]
    output: str


def run_measured(command: tp.Sequence[str], cwd: Path) -> Measure:
    """Run `command` in `cwd` (the repository importable) and measure it alone
    (`tools.child_usage`: the memory of this process does not count); raise with the end of its
    output when it fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), DORA_PACKAGE="demucs")
    load_before = os.getloadavg()[0]
    with open(cwd / "last_command.log", "w+") as log:
        usage = child_usage.run_measured(command, cwd=cwd, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        log.seek(0)
        output = log.read()
    if usage.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({usage.returncode}):\n{output[-3000:]}")
    return Measure(usage.wall_s, usage.peak_rss_mib, (load_before, os.getloadavg()[0]), output)


def base_argv(epochs: int, batches: int, segment: float) -> tp.List[str]:
    """The 4-stem toy model that plays the released one."""
    return ["dset=toy", *ARCHITECTURE, *budget(segment), f"epochs={epochs}",
            f"max_batches={batches}"]


def arm_argvs(base_sig: str, epochs: int, batches: int, lora_rank: int, segment: float
              ) -> tp.Dict[str, tp.List[str]]:
    """The `dora run` overrides of each arm, on the 6-stem toy set at data/toy6."""
    six = ["dset=toy", "dset.musdb=data/toy6", f"dset.sources=[{','.join(SIX)}]",
           f"weights=[{','.join('1' * len(SIX))}]", *budget(segment), f"epochs={epochs}",
           f"max_batches={batches}"]
    init = ",".join(f"{stem}:other" for stem in NEW_STEMS)
    finetune = six + [f"continue_pretrained={base_sig}", "pretrained_repo=release_models",
                      f"continue_sources_init={{{init}}}"]
    return {
        "scratch": six + ARCHITECTURE,
        "finetune": finetune,
        "adapters": finetune + [f"lora.rank={lora_rank}", "lora.targets=[linear,attention,conv]"],
        "frozen encoder": finetune + ["optim.freeze=[encoder.*,tencoder.*]"],
    }


def new_xp(xps: Path, before: tp.Set[str]) -> str:
    """The signature of the one XP folder of `xps` not in `before`."""
    (sig,) = {path.name for path in xps.iterdir()} - before
    return sig


def dora_run(argv: tp.Sequence[str], out: Path) -> tp.Tuple[str, Measure]:
    """Train the XP of `argv` with `dora run` in `out`; (its signature, what it cost)."""
    xps = out / "outputs" / "xps"
    before = {path.name for path in xps.iterdir()} if xps.is_dir() else set()
    measure = run_measured([sys.executable, "-m", "dora", "run", *argv], out)
    return new_xp(xps, before), measure


def test_nsdrs(out: Path, sig: str) -> tp.Dict[str, float]:
    """The test nSDR of each stem (and `nsdr`, their mean) at the XP's last test."""
    history = json.loads((out / "outputs" / "xps" / sig / "history.json").read_text())
    test = [epoch["test"] for epoch in history if "test" in epoch][-1]
    return {key: value for key, value in test.items()
            if key.startswith("nsdr") and "_med" not in key}


def format_table(rows: tp.Mapping[str, tp.Tuple[str, Measure, tp.Mapping[str, float]]]) -> str:
    """A Markdown table: one line per arm, test nSDR per stem, time, peak memory and load."""
    header = ["arm", "XP", *SIX, "mean", "time (s)", "peak RSS (MB)", "load (1 min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, (sig, measure, nsdrs) in rows.items():
        cells = [arm, sig, *(f"{nsdrs[f'nsdr_{stem}']:.2f}" for stem in SIX),
                 f"{nsdrs['nsdr']:.2f}", f"{measure.seconds:.0f}", f"{measure.peak_mb:.0f}",
                 f"{measure.load[0]:.1f} -> {measure.load[1]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_arms(out: Path, base_epochs: int, epochs: int, batches: int, lora_rank: int,
             segment: float, base_sig: tp.Optional[str] = None) -> str:
    """The whole comparison in `out` (from the 4-stem model `base_sig` already exported to
    out/release_models when given); returns the report (also written to out/results.md)."""
    out.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, "-m"]
    for folder, sources in [("data/toy_musdb", []), ("data/toy6", ["--sources", ",".join(SIX)])]:
        if not (out / folder).is_dir():
            run_measured([*python, "tools.toy_musdb", folder, *sources], out)
    base_note = f"the 4-stem base: {base_sig}, exported before"
    if base_sig is None:
        base_sig, base_cost = dora_run(base_argv(base_epochs, batches, segment), out)
        run_measured([*python, "tools.export", base_sig, "-o", "release_models"], out)
        base_note = (f"the 4-stem base: {base_epochs} epochs of {batches} batches "
                     f"({base_cost.seconds:.0f} s)")
    rows = {}
    for arm, argv in arm_argvs(base_sig, epochs, batches, lora_rank, segment).items():
        sig, measure = dora_run(argv, out)
        rows[arm] = (sig, measure, test_nsdrs(out, sig))
        print(f"{arm}: {sig} {measure.seconds:.0f} s", flush=True)
    sigs = [sig for sig, _, _ in rows.values()]
    run_measured([*python, "tools.plot_xp", *sigs, "-o", str(out / "curves.png")], out)
    report = "\n".join([
        f"CPU: {machine.cpu_name()}, {os.cpu_count()} cores; {datetime.date.today()}, commit "
        f"{commit()}; {base_note}; each arm: {epochs} epochs of {batches} batches; batches "
        f"of 4 excerpts of {segment:g} s.", "",
        format_table(rows), "", f"Curves: {out / 'curves.png'}"])
    (out / "results.md").write_text(report + "\n")
    return report


def lora_step(cfg: tp.Any, rank: int, batch_size: int, steps: int) -> dict:
    """Time `steps` training steps (after one untimed) of the model of `cfg`, fully trained
    (`rank` 0) or through adapters of rank `rank`, on CPU; with this process's peak memory."""
    import torch
    from demucs.finetune import count_trainable
    from demucs.lora import add_adapters
    from demucs.train import get_model, get_optimizer
    from tools.bench_models import training_length
    torch.manual_seed(0)
    model = get_model(cfg)
    if rank:
        add_adapters(model, rank)
    optimizer = get_optimizer(model, cfg)
    shape = (batch_size, len(model.sources), model.audio_channels, training_length(cfg))
    sources = 0.1 * torch.randn(*shape)
    mix = sources.sum(dim=1)
    durations = []
    for step in range(1 + steps):
        begin = time.perf_counter()
        loss = (model(mix) - sources).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            durations.append(time.perf_counter() - begin)
    return {"rank": rank, "batch_size": batch_size, "step_s": sum(durations) / len(durations),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": count_trainable(model),
            "total": sum(param.numel() for param in model.parameters())}


def run_lora(rank: int, batch_size: int, steps: int, out: Path) -> str:
    """Full fine-tuning against adapters of rank `rank` on the released htdemucs configuration,
    each in its own process; returns the report."""
    results = []
    for arm_rank in [0, rank]:
        measure = run_measured([sys.executable, "-m", "tools.bench_finetune", "--lora-child",
                                str(arm_rank), "--batch-size", str(batch_size), "--steps",
                                str(steps)], out)
        result = json.loads(measure.output.strip().splitlines()[-1])
        result["load"] = measure.load
        results.append(result)
    full, adapted = results
    lines = ["| training | trainable weights | step (s) | peak RSS (MB) | load (1 min) |",
             "|---|---|---|---|---|"]
    for name, result in [("full fine-tuning", full), (f"LoRA rank {rank}", adapted)]:
        lines.append(f"| {name} | {result['trainable']:,} of {result['total']:,} | "
                     f"{result['step_s']:.2f} | {result['peak_mb']:.0f} | "
                     f"{result['load'][0]:.1f} -> {result['load'][1]:.1f} |")
    saved_mb = full["peak_mb"] - adapted["peak_mb"]
    saved_s = full["step_s"] - adapted["step_s"]
    lines.append(f"\nSaved per batch of {batch_size}: {saved_mb:.0f} MB of peak memory, "
                 f"{saved_s:.2f} s per step ({machine.cpu_name()}, {datetime.date.today()}, commit "
                 f"{commit()}).")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.bench_finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_finetune"),
                        help="folder of the toy sets, the XPs and the results")
    parser.add_argument("--base-epochs", type=int, default=10,
                        help="epochs of the 4-stem model playing the released one")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each arm")
    parser.add_argument("--batches", type=int, default=5, help="batches per epoch")
    parser.add_argument("--segment", type=float, default=2.,
                        help="seconds of each training excerpt")
    parser.add_argument("--base", metavar="SIG",
                        help="start the arms from this 4-stem model of DIR/release_models "
                             "instead of training one")
    parser.add_argument("--lora", action="store_true",
                        help="measure a training step of the released htdemucs configuration "
                             "with and without adapters instead")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the adapters")
    parser.add_argument("--batch-size", type=int, default=1, help="--lora: examples per batch")
    parser.add_argument("--steps", type=int, default=2, help="--lora: timed steps")
    parser.add_argument("--lora-child", type=int, metavar="RANK", help=argparse.SUPPRESS)
    return parser


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    if args.lora_child is not None:  # one arm of --lora, in its own process
        from tools.bench_models import released_htdemucs_config
        print(json.dumps(lora_step(released_htdemucs_config(), args.lora_child,
                                   args.batch_size, args.steps)))
        return
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.lora:
        print(run_lora(args.lora_rank, args.batch_size, args.steps, args.out))
    else:
        print(run_arms(args.out, args.base_epochs, args.epochs, args.batches, args.lora_rank,
                       args.segment, args.base))


if __name__ == "__main__":
    main()
