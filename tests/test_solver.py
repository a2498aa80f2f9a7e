"""Solver internals on in-memory data: batches per epoch, losses, EMAs and best state, SVD
penalty, resume (the checkpoint machinery itself is tested in test_checkpoint.py)."""
import dataclasses
import json
import math
import typing as tp

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from demucs import solver as solver_module
from demucs.checkpoint import load_checkpoint

RATE = 8000
SOURCES = ["drums", "bass", "other", "vocals"]


class Stems(Dataset):
    """Random stems `[S, C, T]` (with the mixture first when `with_mix`), counting reads."""

    def __init__(self, items: int, with_mix: bool, length: int = RATE):
        generator = torch.Generator().manual_seed(items)
        self.stems = 0.1 * torch.randn(items, len(SOURCES), 2, length, generator=generator)
        self.with_mix = with_mix
        self.reads = 0

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        stems = self.stems[index]
        return torch.cat([stems.sum(0, keepdim=True), stems]) if self.with_mix else stems


@pytest.fixture
def make_solver(tmp_path, monkeypatch) -> tp.Callable[..., tp.Any]:
    """Build a Solver for `overrides` with in-memory loaders, inside a Dora XP under tmp_path."""
    from demucs.train import get_solver, main
    monkeypatch.setattr(main.dora, "dir", tmp_path / "outputs")
    monkeypatch.setattr(solver_module, "evaluate",
                        lambda solver, compute_sdr=False: {"nsdr": 1.5, "sdr_called": compute_sdr})

    def build(*overrides: str, train_items: int = 8):
        argv = [f"dset.musdb={tmp_path / 'none'}", f"dset.samplerate={RATE}", "dset.segment=1",
                "dset.shift=0.25", "model=demucs", "demucs.channels=4", "demucs.depth=2",
                "batch_size=2", "augment.remix.group_size=2", "test.sdr=false", *overrides]
        xp = main.get_xp(argv)
        main.init_xp(xp)
        with xp.enter():
            solver = get_solver(xp.cfg, model_only=True)
        solver.xp = xp
        solver.loaders = {
            "train": DataLoader(Stems(train_items, with_mix=False), batch_size=2, shuffle=True,
                                drop_last=True),
            "valid": DataLoader(Stems(2, with_mix=True), batch_size=1)}
        return solver

    return build


@pytest.mark.parametrize("max_batches,expected", [(None, 4), (1, 1), (3, 3), (10, 4)])
def test_epoch_runs_exactly_max_batches(make_solver, max_batches, expected):
    solver = make_solver(f"max_batches={'null' if max_batches is None else max_batches}")
    metrics = solver._train_epoch(0)
    assert solver.loaders["train"].dataset.reads == 2 * expected
    assert {"loss", "reco", "grad", "ms", "reco_drums"} <= set(metrics)


def test_l1_and_mse_losses_match_hand_computation(make_solver):
    solver = make_solver("optim.loss=mse")
    torch.manual_seed(0)
    estimate, sources = torch.randn(3, 4, 2, 10), torch.randn(3, 4, 2, 10)
    weights = torch.tensor([1., 2., 0., 1.])
    loss, reco = solver._loss(estimate, sources, weights)
    per_item = ((estimate - sources) ** 2).mean(dim=(2, 3))
    assert torch.allclose(loss, (per_item.sum(0) * weights).sum() / weights.sum())
    assert torch.allclose(reco, per_item.sqrt().mean(0))
    solver.settings = dataclasses.replace(solver.settings, loss="l1")
    loss, reco = solver._loss(estimate, sources, weights)
    per_source = (estimate - sources).abs().mean(dim=(2, 3)).mean(0)
    assert torch.allclose(reco, per_source)
    assert torch.allclose(loss, (per_source * weights).sum() / weights.sum())
    with pytest.raises(ValueError, match="optim.loss='huber'"):
        make_solver("optim.loss=huber")


def test_train_validates_emas_keeps_best_and_resumes(make_solver):
    overrides = ["epochs=2", "max_batches=2", "ema.batch=[0.9]", "ema.epoch=[0.5]",
                 "svd.penalty=1e-4", "svd.min_size=0", "test.every=1", "save_every=1"]
    solver = make_solver(*overrides)
    with solver.xp.enter():
        solver.train()
    history = solver.history
    assert len(history) == 2
    valid = history[-1]["valid"]
    assert {"main", "ema_batch_0", "ema_epoch_0", "bname", "best", "penalty"} <= set(valid)
    assert valid["best"] == min(epoch["valid"]["loss"] for epoch in history)
    assert history[0]["train"]["penalty"] > 0
    assert history[-1]["test"] == {"nsdr": 1.5, "sdr_called": False}
    folder = solver.folder
    assert (folder / "checkpoint_1.th").exists() and not (folder / "checkpoint_2.th").exists()
    assert not list(folder.glob(".*.partial"))
    package = load_checkpoint(folder / "checkpoint.th")
    assert package["ema_batch_0"]["count"] > 0

    resumed = make_solver(*overrides)
    assert resumed.history == history
    for key, value in resumed.emas["batch"][0].state.items():
        assert torch.equal(value, solver.emas["batch"][0].state[key].cpu())
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, solver.model.state_dict()[key])
    with resumed.xp.enter():
        resumed.train()  # nothing left to do
    assert len(resumed.history) == 2


def test_nsdr_metric_prefers_higher(make_solver):
    solver = make_solver("test.metric=nsdr")
    assert solver._is_better(2., 1.) and not solver._is_better(1., 2.)
    solver = make_solver()
    assert solver._is_better(1., 2.)


def test_history_without_checkpoint_restarts_cleanly(make_solver):
    solver = make_solver("epochs=1", "max_batches=1")
    with solver.xp.enter():
        solver.train()
    (solver.folder / "checkpoint.th").unlink()
    fresh = make_solver("epochs=1", "max_batches=1")
    assert fresh.history == []
    with fresh.xp.enter():
        fresh.train()
    assert len(fresh.history) == 1 and (fresh.folder / "checkpoint.th").exists()
    assert len(json.loads((fresh.folder / "history.json").read_text())) == 1


@pytest.mark.parametrize("quant", ["quant.diffq=1e-4", "quant.qat=8"])
def test_quantization_adds_model_size(make_solver, quant):
    pytest.importorskip("diffq")
    solver = make_solver(quant, "quant.min_size=0.001", "demucs.channels=8", "max_batches=1")
    assert solver.quantizer is not None
    metrics = solver._train_epoch(0)
    assert metrics["ms"] > 0
    if quant.startswith("quant.diffq"):
        assert any(len(group["params"]) for group in solver.optimizer.param_groups[1:])


def _record_conv_dtypes(model: torch.nn.Module) -> tp.List[torch.dtype]:
    dtypes: tp.List[torch.dtype] = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv1d):
            module.register_forward_hook(lambda mod, inputs, out: dtypes.append(out.dtype))
    return dtypes


def test_amp_bf16_trains_in_bfloat16_and_validates_in_float32(make_solver):
    solver = make_solver("optim.amp=bf16", "max_batches=1", "valid_apply=false")
    dtypes = _record_conv_dtypes(solver.model)
    before = [p.detach().clone() for p in solver.model.parameters()]
    metrics = solver._train_epoch(0)
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in solver.model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, solver.model.parameters()))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    dtypes.clear()
    solver._valid_epoch(0)
    assert set(dtypes) == {torch.float32}


@pytest.mark.parametrize("amp, message", [("fp16", "optim.amp=fp16 trains only on CUDA GPUs"),
                                          ("int8", "amp must be bf16, fp16 or None")])
def test_unsupported_training_amp_is_refused(make_solver, amp, message, monkeypatch):
    from demucs import train
    monkeypatch.setattr(train, "training_device", lambda: torch.device("cpu"))
    with pytest.raises(ValueError, match=message):
        make_solver(f"optim.amp={amp}")


def test_misc_compile_compiles_the_trained_model_in_place(make_solver, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    solver = make_solver("misc.compile=true")
    assert compiled == [solver.model]
    assert not make_solver().args.misc.compile


def _upstream_grad_norm(grads: tp.List[torch.Tensor]) -> float:
    """The official trainer's arithmetic: a 0-dim tensor summed from the int 0, then `** 0.5`."""
    total = 0
    for grad in grads:
        total += grad.norm() ** 2
    return float(total ** 0.5)


def test_grad_norm_rounds_like_upstream():
    """The logged gradient norm: squared norms added one after the other in float32, as the
    official trainer does (a stacked norm rounds differently; train_parity compares it)."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(size, generator=generator) * scale
             for size, scale in [(3, 1e-3), (1000, 1.), (7, 30.), (50, 1e-5)] * 25]
    assert solver_module._grad_norm(grads) == _upstream_grad_norm(grads)
    assert solver_module._grad_norm([]) == 0.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_grad_norm_takes_the_root_like_upstream(dtype):
    """The root is torch's `** 0.5` of a 0-dim tensor, as upstream's, not np.sqrt: on CPU torch
    takes it with MKL's vsSqrt, which on AMD CPUs (AVX2 or AVX-512) ends one ulp away from the
    correctly rounded root for about one total in seven; np.sqrt made 27 of these 200 cases
    differ there. Non-contiguous gradients too (their norm is upstream's call on the same
    tensor), and bfloat16, which NumPy cannot add."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        grads = [torch.randn(4, generator=generator).to(dtype),
                 torch.randn(3, 5, generator=generator).to(dtype).t()]
        assert solver_module._grad_norm(grads) == _upstream_grad_norm(grads)


# ---------------------------------------------------------------- fp16 loss scaling
def _fp16_solver(make_solver, *overrides: str, skip_nonfinite: bool = False):
    """A Solver training in fp16 with a CPU `GradScaler` (the config path refuses fp16 off
    CUDA): the parts and settings of `make_solver(*overrides)`, given a scaler and amp=fp16.
    Like any Solver, it resumes from the XP's checkpoint, scaler included."""
    from demucs.train import make_grad_scaler
    base = make_solver(*overrides)
    parts = solver_module.TrainingParts(
        model=base.model, optimizer=base.optimizer, augment=base.augment,
        quantizer=base.quantizer, emas=base.emas, scaler=make_grad_scaler("fp16", "cpu"))
    settings = dataclasses.replace(base.settings, amp="fp16", skip_nonfinite=skip_nonfinite)
    with base.xp.enter():
        solver = solver_module.Solver(base.loaders, parts, settings, base.args)
    solver.xp = base.xp
    return solver


def _poison_next_gradient(param: torch.Tensor) -> None:
    """Make the next gradient of `param` non-finite (once), as an fp16 overflow would."""
    handles = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        handles.pop().remove()
        return grad * float("inf")

    handles.append(param.register_hook(poison))


def _params(solver) -> tp.List[torch.Tensor]:
    return [p.detach().clone() for p in solver.model.parameters()]


def test_fp16_step_unscales_before_the_norm_and_clipping(make_solver, monkeypatch):
    torch.manual_seed(0)
    solver = _fp16_solver(make_solver, "optim.clip_grad=1e-3", "ema.batch=[0.9]")
    clipped_norms = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_",
        lambda params, max_norm: clipped_norms.append(float(clip(params, max_norm))))
    before = _params(solver)
    loss = sum(0.5 * (p ** 2).sum() for p in solver.model.parameters())  # gradient: the weights
    grad_norm = solver._step(loss, (0, 0))
    assert grad_norm == solver_module._grad_norm(before)  # scaling by 2 ** 16 is exact
    assert clipped_norms == [pytest.approx(grad_norm)]
    assert any(not torch.equal(b, p) for b, p in zip(before, solver.model.parameters()))
    assert solver.optimizer.state_dict()["state"][0]["step"] == 1
    assert solver.emas["batch"][0].count == 1
    assert solver.scaler.get_scale() == 65536.
    assert all(p.grad is None or not p.grad.any() for p in solver.model.parameters())


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(make_solver, skip_nonfinite):
    solver = _fp16_solver(make_solver, "ema.batch=[0.9]", skip_nonfinite=skip_nonfinite)
    params = list(solver.model.parameters())
    before = _params(solver)
    _poison_next_gradient(params[0])
    loss = sum(p.sum() for p in params)
    assert solver._step(loss, (0, 0)) is None  # an overflow, whatever optim.skip_nonfinite says
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert solver.optimizer.state_dict()["state"] == {} and solver.emas["batch"][0].count == 0
    assert solver.scaler.get_scale() == 32768.
    assert solver._step(sum(p.sum() for p in params), (0, 1)) == pytest.approx(
        solver_module._grad_norm([torch.ones_like(p) for p in params]))
    assert solver.emas["batch"][0].count == 1  # the scaler recovered: the next step is taken

    solver.scaler.update(new_scale=1.)  # no overflow left to blame: a real non-finite gradient
    before = _params(solver)
    _poison_next_gradient(params[0])
    if skip_nonfinite:
        assert solver._step(sum(p.sum() for p in params), (0, 2)) is None
    else:
        with pytest.raises(solver_module.NonFiniteLossError,
                           match="batch 3: the gradient norm is .* at fp16 loss scale 1"):
            solver._step(sum(p.sum() for p in params), (0, 2))
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert solver.emas["batch"][0].count == 1


def test_fp16_epoch_trains_in_float16_and_counts_overflows(make_solver):
    torch.manual_seed(0)
    solver = _fp16_solver(make_solver, "max_batches=3", "valid_apply=false")
    dtypes = _record_conv_dtypes(solver.model)
    before = _params(solver)
    _poison_next_gradient(next(solver.model.parameters()))
    metrics = solver._train_epoch(0)
    assert torch.float16 in dtypes
    assert metrics["skipped"] == 1 and math.isfinite(metrics["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, solver.model.parameters()))
    assert solver.optimizer.state_dict()["state"][0]["step"] == 2
    assert solver.scaler.get_scale() == 32768.


def test_fp16_epoch_whose_batches_all_overflow_goes_on(make_solver, caplog):
    """At the start of fp16 training the loss scale may be too high for every batch of a short
    epoch: that is the scaler settling, not a failure, so the epoch ends with a warning."""
    torch.manual_seed(0)
    solver = _fp16_solver(make_solver, "max_batches=2", "valid_apply=false")
    before = _params(solver)
    handle = next(solver.model.parameters()).register_hook(lambda grad: grad * float("inf"))
    with solver.xp.enter():
        solver._run_epoch(0)  # validated, logged and saved like any epoch
    handle.remove()
    metrics = solver.history[0]["train"]
    assert metrics["skipped"] == 2 and "loss" not in metrics
    assert all(torch.equal(b, p) for b, p in zip(before, solver.model.parameters()))
    assert solver.scaler.get_scale() == 16384.
    assert "all 2 training batches overflowed while the loss scale settles" in caplog.text
    assert math.isfinite(solver._train_epoch(1)["loss"])  # the next epoch learns


def test_fp16_scaler_state_is_saved_and_resumed(make_solver):
    torch.manual_seed(0)
    overrides = ["epochs=2", "max_batches=2", "test.every=10"]
    solver = _fp16_solver(make_solver, *overrides)
    _poison_next_gradient(next(solver.model.parameters()))
    with solver.xp.enter():
        solver._run_epoch(0)
    state = solver.scaler.state_dict()
    assert state["scale"] == 32768. and state["_growth_tracker"] == 1
    assert load_checkpoint(solver.folder / "checkpoint.th")["grad_scaler"] == state

    resumed = _fp16_solver(make_solver, *overrides)
    assert resumed.history == solver.history and resumed.scaler.state_dict() == state
    with resumed.xp.enter():
        resumed.train()
    assert resumed.scaler.get_scale() == 32768.  # 3 clean steps: far from growth_interval
    assert resumed.scaler.state_dict()["_growth_tracker"] == 3


def test_continue_opt_takes_the_parents_loss_scale(make_solver):
    parent = _fp16_solver(make_solver, "epochs=1", "max_batches=1", "test.every=10")
    parent.scaler.load_state_dict(dict(parent.scaler.state_dict(), scale=1024.))
    with parent.xp.enter():
        parent._run_epoch(0)
    child_overrides = ["epochs=1", "max_batches=1", f"continue_from={parent.folder.name}"]
    child = _fp16_solver(make_solver, *child_overrides, "continue_opt=true")
    assert child.scaler.get_scale() == 1024.
    fresh_optimizer = _fp16_solver(make_solver, *child_overrides)
    assert fresh_optimizer.scaler.get_scale() == 65536.  # without continue_opt, a fresh start


def test_a_checkpoint_without_scaler_resumes_fp16_at_the_initial_scale(make_solver):
    overrides = ["epochs=2", "max_batches=1", "test.every=10"]
    solver = make_solver(*overrides)
    with solver.xp.enter():
        solver._run_epoch(0)
    package = load_checkpoint(solver.folder / "checkpoint.th")
    assert "grad_scaler" not in package  # float32 training has no scaler to save
    resumed = _fp16_solver(make_solver, *overrides)
    assert len(resumed.history) == 1 and resumed.scaler.get_scale() == 65536.


@pytest.mark.parametrize("amp", ["null", "bf16"])
def test_float32_and_bf16_train_without_scaler(make_solver, amp):
    from demucs.train import make_grad_scaler
    solver = make_solver(f"optim.amp={amp}")
    assert solver.scaler is None
    parts = solver_module.TrainingParts(model=solver.model, optimizer=solver.optimizer,
                                        augment=solver.augment,
                                        scaler=make_grad_scaler("fp16", "cpu"))
    with solver.xp.enter(), pytest.raises(ValueError, match="leave TrainingParts.scaler as None"):
        solver_module.Solver(None, parts, solver.settings, solver.args)
    parts.scaler = None
    settings = dataclasses.replace(solver.settings, amp="fp16")
    with solver.xp.enter(), pytest.raises(ValueError, match="make_grad_scaler"):
        solver_module.Solver(None, parts, settings, solver.args)
