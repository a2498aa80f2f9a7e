"""Evaluate a pre-trained model or bag on the test set configured in `conf/`.

    python -m tools.test_pretrained -n NAME [--repo DIR] [--amp bf16|fp16] [--compile]
                                    [--backend onnxruntime [--onnx-dir DIR]] [--no-baselines]
                                    [hydra overrides, e.g. dset=toy test.sdr=true]

Reports the nSDR (always) and the museval SDR (when `test.sdr` is true), per source and averaged,
as one JSON line printed last. Before it, a table shows the model's nSDR beside three baselines
on the same songs (`demucs.evaluate.baseline_scores`): the equal split (mixture/N for each stem),
the scalar-gain oracle (each stem as the best multiple of the mixture) and the ideal ratio mask
(the mixture's STFT masked by each stem's share of the power, knowing the stems). A model that
separates anything beats the equal split; the gain oracle says how far a mere gain on the mixture
can go, the mask oracle about how far a spectrogram mask can. `--no-baselines` leaves them out
(they read the whole test set again).
`--amp`, `--compile` and `--backend onnxruntime` (e.g. with an int8 export as `--onnx-dir`) score
the speed options of the `demucs` command, to compare with the default float32 scores.

The test set is checked before any separation: a missing folder, or songs without some of the
model's stems (a six-stem model on a four-stem set), are refused naming the folder and stems.
"""
import argparse
import json
import logging
from pathlib import Path
import sys
import typing as tp

import torch

from demucs import evaluate, pretrained, train
from demucs.wav import DatasetError
from demucs.backends import BACKENDS, LoadModelError, check_backend, compile_leaves, \
    find_or_export_onnx, load_onnx_model

logger = logging.getLogger("tools.test_pretrained")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.test_pretrained", description=__doc__.splitlines()[0])
    pretrained.add_model_flags(parser)
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                        help="Separate in mixed precision, like `demucs --amp`.")
    parser.add_argument("--compile", action="store_true",
                        help="Compile the model(s) with torch.compile, like `demucs --compile`.")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="Separate with PyTorch or ONNX Runtime, like `demucs --backend`.")
    parser.add_argument("--onnx-dir", type=Path, default=None,
                        help="The ONNX export to score, like `demucs --onnx-dir`.")
    parser.add_argument("--no-baselines", action="store_true",
                        help="Print only the model's scores, without the baselines' table "
                             "(which reads the whole test set again).")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="Hydra overrides of conf/config.yaml (dataset, test options).")
    return parser


def run(name: tp.Optional[str], repo, overrides: tp.List[str], amp: tp.Optional[str] = None,
        compile_model: bool = False, backend: str = "torch",
        onnx_dir: tp.Optional[Path] = None) -> tp.Dict[str, float]:
    """Scores of model `name` (from `repo`) on the test set of the configuration `overrides`,
    separated in the precision `amp` selects and compiled when `compile_model`, or with ONNX
    Runtime (`backend`, the export in `onnx_dir` or one made as `demucs --backend` does).
    A test set that cannot score the model raises `DatasetError` before any separation."""
    check_backend(backend, "cpu", amp, compile_model)
    xp = train.main.get_xp(overrides)  # a bad override stops here, before the model is loaded
    if backend == "onnxruntime":
        folder, pytorch_model = find_or_export_onnx(name or pretrained.DEFAULT_MODEL, repo,
                                                    onnx_dir)
        model = load_onnx_model(folder, "cpu", pytorch_model)
    else:
        model = pretrained.get_model_from_args(argparse.Namespace(name=name, repo=repo))
    settings = evaluate.EvaluationSettings.from_config(xp.cfg)
    problems = evaluate.problems_of_test_set(settings, model.sources)
    if problems:
        raise DatasetError(problems, context=f"the test set of {name or pretrained.DEFAULT_MODEL}")
    if compile_model:
        compile_leaves(model)
    with xp.enter():
        solver = train.get_solver(xp.cfg, model_only=True)
        solver.model = model.to(solver.device)
        solver.model.eval()
        with torch.no_grad():
            return evaluate.evaluate(solver, compute_sdr=xp.cfg.test.sdr, amp=amp)


def run_baselines(overrides: tp.List[str],
                  sources: tp.Sequence[str]) -> tp.Dict[str, tp.Dict[str, float]]:
    """nSDR of `demucs.evaluate.BASELINES` for `sources` on the test set of the configuration
    `overrides` (the songs `run` scores the model on)."""
    xp = train.main.get_xp(overrides)
    settings = evaluate.EvaluationSettings.from_config(xp.cfg)
    return evaluate.baseline_scores(settings, sources)


def scored_sources(scores: tp.Dict[str, float]) -> tp.List[str]:
    """The sources of `evaluate.summarize`'s scores, in order (each has a `nsdr_med_<source>`)."""
    prefix = "nsdr_med_"
    return [key[len(prefix):] for key in scores if key.startswith(prefix)]


def score_table(rows: tp.Dict[str, tp.Dict[str, float]], sources: tp.Sequence[str]) -> str:
    """nSDR per source and averaged (`nsdr_<source>`, `nsdr`), one row per named score dict."""
    width = max(len(name) for name in rows)
    header = " " * width + "".join(f"{source:>9}" for source in sources) + f"{'mean':>9}"
    lines = [header]
    for name, scores in rows.items():
        values = [scores[f"nsdr_{source}"] for source in sources] + [scores["nsdr"]]
        lines.append(f"{name:<{width}}" + "".join(f"{value:9.2f}" for value in values))
    return "\n".join(lines)


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        scores = run(args.name or args.sig, args.repo, args.overrides, amp=args.amp,
                     compile_model=args.compile, backend=args.backend, onnx_dir=args.onnx_dir)
    except (pretrained.ModelLoadingError, FileNotFoundError, LoadModelError, ImportError,
            ValueError) as error:
        logger.error("tools.test_pretrained: %s", error)
        sys.exit(1)
    logger.info("Test scores of %s: %s", args.name, json.dumps(scores, indent=2))
    if not args.no_baselines:
        sources = scored_sources(scores)
        rows = {f"model {args.name or args.sig or pretrained.DEFAULT_MODEL}": scores}
        for key, baseline in run_baselines(args.overrides, sources).items():
            rows[evaluate.BASELINES[key]] = baseline
        print(f"nSDR in dB on the test set:\n{score_table(rows, sources)}")
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
