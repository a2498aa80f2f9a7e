"""Evaluate a pre-trained model or bag on the test set configured in `conf/`.

    python -m tools.test_pretrained -n NAME [--repo DIR] [hydra overrides,
                                    e.g. dset=toy test.sdr=true]

Reports the nSDR (always) and the museval SDR (when `test.sdr` is true), per source and averaged.
"""
import argparse
import json
import logging
import sys
import typing as tp

import torch

from demucs import evaluate, pretrained, train

logger = logging.getLogger("tools.test_pretrained")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.test_pretrained", description=__doc__.splitlines()[0])
    pretrained.add_model_flags(parser)
    parser.add_argument("overrides", nargs="*", default=[],
                        help="Hydra overrides of conf/config.yaml (dataset, test options).")
    return parser


def run(name: tp.Optional[str], repo, overrides: tp.List[str]) -> tp.Dict[str, float]:
    """Scores of model `name` (from `repo`) on the test set of the configuration `overrides`."""
    model = pretrained.get_model_from_args(argparse.Namespace(name=name, repo=repo))
    xp = train.main.get_xp(overrides)
    with xp.enter():
        solver = train.get_solver(xp.cfg, model_only=True)
        solver.model = model.to(solver.device)
        solver.model.eval()
        with torch.no_grad():
            return evaluate.evaluate(solver, compute_sdr=xp.cfg.test.sdr)


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        scores = run(args.name or args.sig, args.repo, args.overrides)
    except (pretrained.ModelLoadingError, FileNotFoundError) as error:
        logger.error("%s", error)
        sys.exit(1)
    logger.info("Test scores of %s: %s", args.name, json.dumps(scores, indent=2))
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
