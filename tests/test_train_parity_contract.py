"""The random-draw contract of training, pinned without the official package (issue 16).

A seeded toy XP (tiny Demucs on the 8 kHz toy MusDB of training_helpers, default augmentation
but repitch, which needs soundstretch) trains for 2 epochs of 2 batches in one process (loading
workers would only move repitch's draws, which is off, out of the main process; torch's loader
draws its seed from the main generator either way). What it must give was recorded from this
project once `../shared/bench/train_parity.py` had shown it drawing exactly like the official
trainer (BIT-IDENTICAL batches, losses, valid losses and weights, demucs/hdemucs/htdemucs):

* the SHA-1 of every training batch as the loader gives it (the shuffle order and the random
  shift of each example) and after augmentation (flips, sign flips, gains, the remix
  permutation);
* the next draw of torch's, Python's and NumPy's generators in the main process once training
  is over: any extra or missing draw anywhere (an augmentation deciding with another generator,
  one more shift in validation) moves them;
* the per-batch losses and valid losses, to 1e-5 relative only, as convolution kernels may
  round differently on another CPU.

A speed change that consumes the generators differently fails here; if the change is meant
(and train_parity still reports BIT-IDENTICAL against the official trainer), record the new
values with `RECORD=1 pytest tests/test_train_parity_contract.py -s`.
"""
import hashlib
import os
import random

import numpy as np
import pytest
import torch

from demucs import solver as solver_module
from training_helpers import base_argv, write_tiny_musdb

EXPECTED = {
    "batches": [("c30884690db73404", "43b86b5eaa318957"), ("4e08310afffe0779", "8900719607529cb6"),
                ("7036c31c7036dd8c", "4df178c9c9f38fee"), ("bd6bbef28fc97feb", "e87d5b268ec556cb")],
    "losses": [0.3265573, 0.447277, 0.3186968, 0.3179128],
    "valid": [0.4515434, 0.4514821],
    "next_draws": [0.8457770347595215, 0.21863797480360336, 0.3745401188473625],
}


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def _toy_run(tmp_path, monkeypatch) -> dict:
    from demucs.train import get_solver, main
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    monkeypatch.setattr(solver_module, "evaluate", lambda solver, compute_sdr=False: {})
    musdb = write_tiny_musdb(tmp_path / "musdb")
    xp = main.get_xp(base_argv(musdb, "demucs", epochs=2))
    main.init_xp(xp)
    record: dict = {"batches": [], "losses": []}
    with xp.enter():
        solver = get_solver(xp.cfg)
        augment = solver.augment

        def recorded_augment(batch: torch.Tensor) -> torch.Tensor:
            out = augment(batch)
            record["batches"].append((_sha(batch), _sha(out)))
            return out
        solver.augment = recorded_augment
        train_step = solver._train_step

        def recorded_step(*args):
            losses = train_step(*args)
            record["losses"].append(round(float(losses["loss"]), 7))
            return losses
        solver._train_step = recorded_step
        solver.train()
    record["valid"] = [round(float(epoch["valid"]["loss"]), 7) for epoch in solver.history]
    record["next_draws"] = [float(torch.rand(1)), random.random(), float(np.random.rand())]
    return record


def test_seeded_toy_training_draws_as_recorded(tmp_path, monkeypatch):
    got = _toy_run(tmp_path, monkeypatch)
    if os.environ.get("RECORD"):
        print(f"\nEXPECTED = {got!r}")
        return
    expected = EXPECTED
    assert got["batches"] == expected["batches"]
    assert got["next_draws"] == expected["next_draws"]
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    assert got["valid"] == pytest.approx(expected["valid"], rel=1e-5)
