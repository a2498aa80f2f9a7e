"""The training loop of one XP: epochs of training, validation (raw model and EMAs), periodic tests,
metrics pushed to Dora's history and checkpoints that allow an exact resume.

The Solver builds nothing from the configuration: `train.get_solver` hands it the objects it
trains with (`TrainingParts`) and the scalar settings of the loop (`TrainingSettings`). What it
keeps on disk, and the XP lock, live in `demucs.checkpoint`.

Reliability (see docs/reliability.md): a non-finite loss or gradient stops the run before it
reaches the weights (or skips the batch with `optim.skip_nonfinite`); checkpoints are written
atomically and hold the random generators, so a resumed run continues exactly as if it had not
stopped.

fp16 training (`optim.amp=fp16`, CUDA only) scales the loss with the `GradScaler` of
`TrainingParts.scaler`: a batch whose scaled gradients overflow is skipped and the scale lowered,
as loss scaling intends, whatever `optim.skip_nonfinite` says (see `Solver._step`).
"""
from dataclasses import dataclass, field
import itertools
import logging
import math
from pathlib import Path
import time
import typing as tp

from dora import get_xp
import numpy as np
from omegaconf import DictConfig, OmegaConf
import torch
from torch.nn import functional as F
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from . import augment  # noqa: F401  (importable from here, as in Demucs 4.1)
from . import distrib, states
from .apply import apply_model
from .checkpoint import (BEST_NAME, CHECKPOINT_NAME, CheckpointError, CheckpointWriteError,
                         checkpoint_package, load_checkpoint, remove_unfinished_writes,
                         restore_checkpoint, save_atomic, XPLockedError)
from .ema import ModelEMA
from .evaluate import EvaluationSettings, evaluate, new_sdr
from .rounding import upstream_rounding
from .svd import svd_penalty
from .tracking import EpochTracker, log_summary, SUMMARY_STAGES
from .utils import autocast, EMA, pull_metric
from .warm_start import continue_from_xp

logger = logging.getLogger(__name__)

# A gradient still non-finite once the loss scale is down to this is not an fp16 overflow: it
# takes the path of any non-finite gradient (stop, or skip with `optim.skip_nonfinite`).
MIN_LOSS_SCALE = 1.

# (epoch, batch index) of a batch, for error messages.
BatchPosition = tp.Tuple[int, int]
Losses = tp.Dict[str, tp.Any]


class NonFiniteLossError(FloatingPointError):
    """A training batch gave a NaN/inf loss or gradient; raised before it changes any weight."""


@dataclass(frozen=True)
class TrainingSettings:
    """The scalar settings of the training loop, read once from the config by `train.get_solver`
    (config keys in brackets)."""
    epochs: int  # [epochs]
    batch_size: int  # per worker [batch_size / number of workers]
    max_train_batches: tp.Optional[int]  # None: the whole loader [max_batches, debug, flag=debug]
    max_valid_batches: tp.Optional[int]  # [max_batches, flag=debug]
    loss: str  # "l1" or "mse" [optim.loss]
    weights: tp.Tuple[float, ...]  # per source [weights]
    clip_grad: float  # 0: no clipping [optim.clip_grad]
    skip_nonfinite: bool  # [optim.skip_nonfinite]
    amp: tp.Optional[str]  # None, "bf16" or "fp16" (needs TrainingParts.scaler) [optim.amp]
    diffq: float  # weight of the model size in the loss, 0: none [quant.diffq]
    svd_penalty: float  # [svd.penalty]
    svd: tp.Mapping[str, tp.Any]  # keyword arguments of `svd_penalty` [svd.*]
    valid_apply: bool  # validate through `apply_model` [valid_apply]
    valid_split: bool  # [test.split]
    test_every: int  # [test.every]
    test_sdr: bool  # museval SDR at the last epoch [test.sdr]
    test_best: bool  # test the best state rather than the last one [test.best]
    metric: str  # selects the best state: "loss" (lower) or "nsdr*" (higher) [test.metric]
    train_valid: bool  # every epoch's state is the best [dset.train_valid]
    save_every: tp.Optional[int]  # [save_every]
    evaluation: EvaluationSettings  # the test set and how it is scored [test.*, dset.musdb*]
    continue_from: tp.Optional[str] = None  # an XP signature [continue_from, matched if numeric]
    continue_best: bool = True  # [continue_best]
    continue_opt: bool = False  # [continue_opt]
    continue_pretrained: tp.Optional[str] = None  # [continue_pretrained]
    pretrained_repo: tp.Optional[str] = None  # [pretrained_repo]
    log_params_without_grad: bool = False  # [flag=uns]
    tensorboard: bool = False  # TensorBoard events in the XP folder [misc.tensorboard]
    wandb_project: tp.Optional[str] = None  # W&B project, None: off [misc.wandb(_project)]
    test_set: bool = True  # False: no test set, no test metrics [dset.musdb/test missing, empty]


@dataclass
class TrainingParts:
    """The objects the Solver trains with, built from the config by `train.get_solver`."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    augment: torch.nn.Module  # applied to the training batches of stems
    quantizer: tp.Any = None  # DiffQ / QAT quantizer, or None
    emas: tp.Dict[str, tp.List[ModelEMA]] = field(
        default_factory=lambda: {"batch": [], "epoch": []})
    parallel_model: tp.Optional[torch.nn.Module] = None  # `model` wrapped for DDP, if it is
    scaler: tp.Optional[torch.amp.GradScaler] = None  # loss scaler of fp16 training, else None


def _grad_norm(grads: tp.List[torch.Tensor]) -> float:
    """The global norm of `grads`, rounded like upstream's metric: each tensor's norm squared in
    its dtype, the squares added one after the other in that dtype (NumPy's `add.accumulate` is
    sequential, unlike a reduction kernel), then the root of that 0-dim tensor with torch's
    `** 0.5` on the gradients' device. Not np.sqrt: on CPU torch takes the root with MKL's
    vsSqrt, which on AMD CPUs is not correctly rounded (one total in seven ends one ulp away)."""
    if not grads:
        return 0.
    squares = torch.stack([g.norm() for g in grads]) ** 2
    if squares.dtype == torch.bfloat16:  # NumPy has no bfloat16: add as upstream, one by one
        total = squares[0]
        for square in squares[1:]:
            total = total + square
    else:  # one transfer to the host for the adds
        total = torch.tensor(np.add.accumulate(squares.cpu().numpy())[-1],
                             dtype=squares.dtype, device=squares.device)
    return float(total ** 0.5)


def _checked_scaler(scaler: tp.Optional[torch.amp.GradScaler],
                    amp: tp.Optional[str]) -> tp.Optional[torch.amp.GradScaler]:
    """`scaler`, checked against `amp`: fp16 training needs one, float32 and bf16 take none."""
    if amp == "fp16" and scaler is None:
        raise ValueError("TrainingSettings.amp='fp16' needs TrainingParts.scaler, a loss scaler: "
                         "build it with demucs.train.make_grad_scaler('fp16', device).")
    if amp != "fp16" and scaler is not None:
        raise ValueError(f"TrainingSettings.amp={amp!r} trains without loss scaling: leave "
                         "TrainingParts.scaler as None (it is for amp='fp16' only).")
    return scaler


def _detached(losses: Losses) -> Losses:
    return {key: value.detach() if torch.is_tensor(value) else value
            for key, value in losses.items()}


class _EpochMeter:
    """Running means of the metrics of an epoch's batches, and how many were kept or skipped."""

    def __init__(self) -> None:
        self._average = EMA()
        self.averages: tp.Dict[str, float] = {}
        self.count = 0
        self.skipped = 0
        self.overflows = 0  # skipped batches whose fp16 gradients overflowed (loss scaling)

    def add(self, losses: tp.Optional[Losses]) -> bool:
        """Fold in one batch's metrics (None: a skipped batch); True when they were kept."""
        if losses is None:
            self.skipped += 1
            return False
        self.averages = self._average({key: float(value) for key, value in losses.items()})
        self.count += 1
        return True


class Solver:
    """Trains `parts.model` on `loaders['train']` and validates it on `loaders['valid']`.

    All state lives in the XP folder given by Dora (`checkpoint.th`, `best.th`, `history.json`);
    creating a Solver on a folder with a checkpoint resumes training exactly where it stopped.
    `args` is the full config: it is only stored (in checkpoints, in `best.th` as
    `training_args`, as the W&B run's config) and read by `evaluate` and `tools.export`.
    """

    def __init__(self, loaders: tp.Optional[dict], parts: TrainingParts,
                 settings: TrainingSettings, args: DictConfig):
        self.args = args
        self.settings = settings
        self.loaders = loaders
        self.model = parts.model
        self.optimizer = parts.optimizer
        self.quantizer = parts.quantizer
        self.augment = parts.augment
        self.emas = parts.emas
        self.dmodel = parts.parallel_model or parts.model
        self.scaler = _checked_scaler(parts.scaler, settings.amp)
        self.device = next(iter(self.model.parameters())).device
        self.weights = torch.tensor(list(settings.weights), dtype=torch.float32,
                                    device=self.device)
        xp = get_xp()
        self.folder = Path(xp.folder)
        self.checkpoint_file = self.folder / CHECKPOINT_NAME
        self.best_file = self.folder / BEST_NAME
        self.link = xp.link
        self.history = self.link.history
        self.best_state: tp.Optional[dict] = None
        self.best_changed = False
        self._meter = _EpochMeter()  # the epoch's, while `_run_batches` runs
        # called before each batch: raises when the run was asked to stop (set by train.main,
        # see train.StopSignals), also when the signal's exception was lost in a destructor
        self.stop_check: tp.Callable[[], None] = lambda: None
        main_worker = distrib.rank == 0
        self.tracker = EpochTracker(
            self.folder, settings.tensorboard and main_worker,
            wandb_project=settings.wandb_project if main_worker else None,
            config=OmegaConf.to_container(args, resolve=True) if settings.wandb_project else None)
        self._reset()

    # ---------------------------------------------------------------- state
    def _serialize(self, epoch: int) -> None:
        """Write checkpoint.th (every epoch), checkpoint_<N>.th (`save_every`) and best.th."""
        package = checkpoint_package(self.model, self.optimizer, self.history, self.best_state,
                                     self.args, self.emas, self.scaler)
        if self.best_changed:
            # best.th first: a crash before checkpoint.th is written replays the epoch, which
            # rewrites best.th if needed.
            best = states.serialize_model(self.model, self.args)
            best["state"] = self.best_state
            save_atomic(best, self.best_file)
            self.best_changed = False
        save_atomic(package, self.checkpoint_file)
        every = self.settings.save_every
        if every and (epoch + 1) % every == 0 and epoch + 1 != self.settings.epochs:
            save_atomic(package, self.folder / f"checkpoint_{epoch + 1}.th")

    def _reset(self) -> None:
        """Resume from this XP's checkpoint, or start from another XP (a pretrained model gave
        the model its weights when it was built)."""
        settings = self.settings
        if distrib.rank == 0:
            remove_unfinished_writes(self.folder)
        if self.checkpoint_file.exists():
            logger.info("Loading checkpoint %s", self.checkpoint_file)
            self._resume(load_checkpoint(self.checkpoint_file))
        elif settings.continue_pretrained:  # its weights came with the model (train.build_model)
            logger.info("Fine-tuning %s: the model starts with its weights",
                        settings.continue_pretrained)
        elif settings.continue_from:
            self.best_state = continue_from_xp(
                self.folder.parent / settings.continue_from, self.model, settings.continue_best,
                self.optimizer if settings.continue_opt else None, self.scaler)

    def _resume(self, package: dict) -> None:
        self.link.update_history(package["history"])
        self.best_state = package["best_state"]
        restore_checkpoint(package, self.model, self.optimizer, self.emas, self.checkpoint_file,
                           self.scaler)

    # ---------------------------------------------------------------- epochs
    def train(self) -> None:
        """Run the remaining epochs (all of them on a fresh XP)."""
        if self.history:
            logger.info("Replaying metrics from the previous run")
            for epoch, metrics in enumerate(self.history):
                for stage in SUMMARY_STAGES:
                    if stage.lower() in metrics:
                        log_summary(stage, epoch, metrics[stage.lower()])
        try:
            for epoch in range(len(self.history), self.settings.epochs):
                self._run_epoch(epoch)
        finally:
            self.tracker.close()

    def _run_epoch(self, epoch: int) -> None:
        """Train, validate, test when due, record the metrics and save the checkpoint."""
        settings = self.settings
        begin = time.time()
        metrics = {"train": self._train_epoch(epoch)}
        log_summary("Train", epoch, metrics["train"])
        if self._validates():
            metrics["valid"], best_candidate = self._validate(epoch)
            log_summary("Valid", epoch, metrics["valid"])
            if metrics["valid"][settings.metric] == metrics["valid"]["best"] \
                    or settings.train_valid:
                logger.info("New best valid %s %.4f", settings.metric,
                            metrics["valid"][settings.metric])
                self.best_state = best_candidate
                self.best_changed = True
        else:  # no valid set (dset.valid_tracks=0): the last state is the best one
            self.best_state = states.copy_state(self.model.state_dict())
            self.best_changed = True
        is_last = epoch == settings.epochs - 1
        if settings.test_set and ((epoch + 1) % settings.test_every == 0 or is_last):
            metrics["test"] = self._test(compute_sdr=settings.test_sdr and is_last)
            log_summary("Test", epoch, metrics["test"])
        self.link.push_metrics(metrics)
        self.tracker.log_epoch(epoch, metrics, self.optimizer.param_groups[0]["lr"],
                               time.time() - begin)
        if distrib.rank == 0:
            self._serialize(epoch)
            logger.debug("Checkpoint saved to %s", self.checkpoint_file)

    def _train_epoch(self, epoch: int) -> dict:
        """One pass of `_train_step` over the train loader; the epoch's mean metrics over all
        workers (with `skipped`, the count of skipped batches, under `optim.skip_nonfinite` or
        fp16 loss scaling)."""
        self.model.train()
        meter = self._run_batches("train", epoch, self._train_step)
        for ema in self.emas["epoch"]:
            ema.update()
        metrics = distrib.average(meter.averages, meter.count)
        if self.settings.skip_nonfinite or self.scaler is not None:
            metrics["skipped"] = meter.skipped  # the same on every worker: decided jointly
        return metrics

    def _valid_epoch(self, epoch: int) -> dict:
        """One pass of `_valid_step` over the valid loader; the mean metrics over all workers."""
        meter = self._run_batches("valid", epoch, self._valid_step)
        return distrib.average(meter.averages, meter.count)

    def _run_batches(self, name: str, epoch: int,
                     step: tp.Callable[[torch.Tensor, BatchPosition], tp.Optional[Losses]]
                     ) -> _EpochMeter:
        """Run `step` on the batches of `loaders[name]` (capped by `max_*_batches`)."""
        assert self.loaders is not None, "this Solver was built with model_only=True"
        loader = self.loaders[name]
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):
            loader.sampler.set_epoch(epoch)
        cap = getattr(self.settings, f"max_{name}_batches")
        total = min(len(loader), cap) if cap else len(loader)
        progress = tqdm(itertools.islice(loader, total), total=total, unit="batch",
                        desc=f"{name.capitalize()} | Epoch {epoch + 1}", leave=False,
                        disable=distrib.rank != 0, dynamic_ncols=True)
        meter = _EpochMeter()
        self._meter = meter
        examples = 0
        for index, batch in enumerate(progress):
            self.stop_check()
            examples += len(batch) * distrib.world_size
            added = meter.add(step(batch.to(self.device), (epoch, index)))
            if added and not progress.disable:  # a disabled bar (workers > 0) has no clock
                rate = examples / max(progress.format_dict["elapsed"], 1e-9)
                progress.set_postfix(loss=f"{meter.averages['loss']:.4f}", ex_s=f"{rate:.1f}")
        if meter.count == 0 and meter.skipped == meter.overflows > 0:
            assert self.scaler is not None
            logger.warning("Epoch %d: the fp16 gradients of all %d training batches overflowed "
                           "while the loss scale settles (now %g); nothing was learnt in this "
                           "epoch, training goes on.", epoch + 1, meter.skipped,
                           self.scaler.get_scale())
            return meter
        if meter.count == 0 and meter.skipped:
            raise NonFiniteLossError(
                f"Epoch {epoch + 1}: all {meter.skipped} training batches had a non-finite loss "
                f"or gradient and were skipped; nothing was learnt. Lower optim.lr or check "
                "the data.")
        if meter.count == 0:
            raise RuntimeError(f"The {name} loader gave no batch: the dataset is smaller than "
                               f"batch_size={self.settings.batch_size} (drop_last) or empty.")
        return meter

    def _validates(self) -> bool:
        """False when the run trains without validation (its valid loader is None)."""
        return self.loaders is None or self.loaders.get("valid") is not None

    def _is_better(self, candidate: float, reference: float) -> bool:
        if self.settings.metric.startswith("nsdr"):
            return candidate > reference
        return candidate < reference

    def _validate(self, epoch: int) -> tp.Tuple[dict, dict]:
        """Validate the raw model and every EMA; returns the metrics and the best model state.
        The models compute in upstream's order (`upstream_rounding`), so that the valid metrics
        are the official trainer's for the same weights."""
        key = self.settings.metric
        self.model.eval()
        with torch.no_grad(), upstream_rounding():
            valid: tp.Dict[str, tp.Any] = {"main": self._valid_epoch(epoch)}
            best_name = "main"
            best_state = states.copy_state(self.model.state_dict())
            for kind, emas in self.emas.items():
                for index, ema in enumerate(emas):
                    name = f"ema_{kind}_{index}"
                    with ema.swap():
                        valid[name] = self._valid_epoch(epoch)
                        if self._is_better(valid[name][key], valid[best_name][key]):
                            best_name = name
                            best_state = states.copy_state(self.model.state_dict())
        valid.update(valid[best_name])
        valid["bname"] = best_name
        previous = pull_metric(self.history, f"valid.{key}")
        pick = max if key.startswith("nsdr") else min
        valid["best"] = pick(previous + [valid[key]])
        if self.settings.svd_penalty > 0:
            with torch.no_grad():
                valid["penalty"] = float(svd_penalty(self.model, exact=True, **self.settings.svd))
        return valid, best_state

    def _test(self, compute_sdr: bool) -> dict:
        """Evaluate on the test set, with the best state when `test.best`."""
        if self.settings.test_best and self.best_state is not None:
            state = self.best_state
        else:
            state = states.copy_state(self.model.state_dict())
        self.model.eval()
        with states.swap_state(self.model, state), torch.no_grad(), upstream_rounding():
            return evaluate(self, compute_sdr=compute_sdr)

    # ---------------------------------------------------------------- batches
    def _train_step(self, sources: torch.Tensor, where: BatchPosition) -> tp.Optional[Losses]:
        """Augment a batch of stems `[B, S, C, T]`, separate their mix, backpropagate the loss and
        step the optimizer; returns the batch's metrics, or None when the batch was skipped
        (`optim.skip_nonfinite`)."""
        sources = self.augment(sources)
        mix = sources.sum(dim=1)
        with autocast(self.device, self.settings.amp):
            estimate = self.dmodel(mix)
        estimate = estimate.float()
        if hasattr(self.model, "transform_target"):
            sources = self.model.transform_target(mix, sources)
        loss, losses = self._reconstruction(estimate, sources)
        if self.settings.svd_penalty > 0:
            penalty = svd_penalty(self.model, **self.settings.svd)
            losses["penalty"] = penalty
            loss = loss + self.settings.svd_penalty * penalty
        losses["loss"] = loss
        grad = self._step(loss, where)
        if grad is None:
            return None
        losses["grad"] = grad
        return _detached(losses)

    def _valid_step(self, item: torch.Tensor, where: BatchPosition) -> Losses:
        """Separate the mixture of a valid batch `[B, 1 + S, C, T]` (through `apply_model`, with
        `test.split`, when `valid_apply`) and return its losses and nSDRs; `where` is unused."""
        mix, sources = item[:, 0], item[:, 1:]
        if self.settings.valid_apply:
            estimate = apply_model(self.model, mix, split=self.settings.valid_split, overlap=0)
        else:
            estimate = self.dmodel(mix).float()
        loss, losses = self._reconstruction(estimate, sources)
        nsdrs = new_sdr(sources, estimate.detach()).mean(0)
        for source, value in zip(self.model.sources, nsdrs):
            losses[f"nsdr_{source}"] = value
        losses["nsdr"] = (nsdrs * self.weights).sum() / self.weights.sum()
        losses["loss"] = loss
        return _detached(losses)

    def _reconstruction(self, estimate: torch.Tensor,
                        sources: torch.Tensor) -> tp.Tuple[torch.Tensor, Losses]:
        """The loss of a batch (reconstruction, plus the model size under DiffQ) and its metrics
        `reco`, `ms` and `reco_<source>`."""
        if estimate.shape != sources.shape:
            raise RuntimeError(f"Model output {tuple(estimate.shape)} does not match the "
                               f"targets {tuple(sources.shape)}.")
        weights = self.weights
        loss, reco = self._loss(estimate, sources, weights)
        model_size = self.quantizer.model_size() if self.quantizer is not None else 0.
        if self.settings.diffq:
            loss = loss + self.settings.diffq * model_size
        losses: Losses = {"reco": (reco * weights).sum() / weights.sum(), "ms": model_size}
        for source, value in zip(self.model.sources, reco):
            losses[f"reco_{source}"] = value
        return loss, losses

    def _loss(self, estimate: torch.Tensor, sources: torch.Tensor,
              weights: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Weighted reconstruction loss and per-source `reco` (l1, or rms error for mse)."""
        dims = tuple(range(2, sources.dim()))
        if self.settings.loss == "l1":
            loss = F.l1_loss(estimate, sources, reduction="none").mean(dims).mean(0)
            reco = loss
        else:
            loss = F.mse_loss(estimate, sources, reduction="none").mean(dims)
            reco = loss.sqrt().mean(0)
            loss = loss.sum(0)
        return (loss * weights).sum() / weights.sum(), reco

    def _step(self, loss: torch.Tensor, where: BatchPosition) -> tp.Optional[float]:
        """Backward, gradient norm (and clipping), optimizer step and batch EMAs.

        A non-finite loss or gradient norm stops here, before the step and the EMA updates:
        `NonFiniteLossError`, or None (batch skipped) with `optim.skip_nonfinite`. With a loss
        scaler (fp16), see `_scaled_step`.
        """
        if self.scaler is not None:
            return self._scaled_step(loss, self.scaler, where)
        value = float(loss.detach())
        if not self._finite_everywhere(value):
            return self._non_finite(f"the loss is {value}", where)
        loss.backward()
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        grad_norm = _grad_norm(grads)
        if not self._finite_everywhere(grad_norm):
            return self._non_finite(f"the gradient norm is {grad_norm}", where)
        if self.settings.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_grad)
        self._log_params_without_grad()
        self.optimizer.step()
        self.optimizer.zero_grad()
        for ema in self.emas["batch"]:
            ema.update()
        return grad_norm

    def _scaled_step(self, loss: torch.Tensor, scaler: torch.amp.GradScaler,
                     where: BatchPosition) -> tp.Optional[float]:
        """`_step` with fp16 loss scaling: backward of the scaled loss, gradients unscaled before
        their norm and clipping, `scaler.step` and `scaler.update`.

        A non-finite loss is handled as in `_step`. A non-finite gradient while the scale is above
        `MIN_LOSS_SCALE` is an fp16 overflow: the batch is skipped (None, counted in `skipped`)
        and the scaler lowers its scale, leaving the weights and EMAs untouched. Below that, it
        is a real non-finite gradient: `NonFiniteLossError`, or skipped with
        `optim.skip_nonfinite`.
        """
        value = float(loss.detach())
        if not self._finite_everywhere(value):
            return self._non_finite(f"the loss is {value}", where)
        scaler.scale(loss).backward()
        scaler.unscale_(self.optimizer)
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        grad_norm = _grad_norm(grads)
        if not self._finite_everywhere(grad_norm):
            return self._scaled_overflow(scaler, grad_norm, where)
        if self.settings.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_grad)
        self._log_params_without_grad()
        scaler.step(self.optimizer)  # the gradients are finite: the step is taken
        scaler.update()
        self.optimizer.zero_grad()
        for ema in self.emas["batch"]:
            ema.update()
        return grad_norm

    def _scaled_overflow(self, scaler: torch.amp.GradScaler, grad_norm: float,
                         where: BatchPosition) -> None:
        """Skip a batch whose unscaled gradients are not finite and lower the loss scale; stop (or
        skip, with `optim.skip_nonfinite`) when the scale was already down to `MIN_LOSS_SCALE`."""
        scale = scaler.get_scale()
        scaler.update()  # sees the inf/nan found by unscale_: backs the scale off
        if scale <= MIN_LOSS_SCALE:
            return self._non_finite(f"the gradient norm is {grad_norm} at fp16 loss scale "
                                    f"{scale:g}", where)
        self.optimizer.zero_grad()
        self._meter.overflows += 1
        epoch, batch = where
        logger.info("Epoch %d, batch %d: fp16 gradients overflowed at loss scale %g, batch "
                    "skipped, scale lowered to %g", epoch + 1, batch + 1, scale,
                    scaler.get_scale())
        return None

    def _log_params_without_grad(self) -> None:
        """Log the parameters that got no gradient (`flag=uns`)."""
        if self.settings.log_params_without_grad:
            for name, param in self.model.named_parameters():
                if param.grad is None:
                    logger.info("No gradient for %s", name)

    @staticmethod
    def _finite_everywhere(value: float) -> bool:
        """True when `value` is finite on every worker (all of them must skip or stop together,
        or the next gradient all-reduce would wait forever)."""
        return distrib.average([float(math.isfinite(value))])[0] == 1.

    def _non_finite(self, what: str, where: BatchPosition) -> None:
        """Drop this batch's gradients; stop, or skip the batch with `optim.skip_nonfinite`."""
        epoch, batch = where
        self.optimizer.zero_grad()
        if self.settings.skip_nonfinite:
            logger.warning("Epoch %d, batch %d: %s, batch skipped (optim.skip_nonfinite)",
                           epoch + 1, batch + 1, what)
            return None
        raise NonFiniteLossError(
            f"Epoch {epoch + 1}, batch {batch + 1}: {what}. Training stopped before the optimizer "
            f"step: the weights, the EMAs and the last checkpoint ({self.checkpoint_file}) are "
            "untouched. Lower optim.lr, set optim.clip_grad, check the dataset for bad audio, or "
            "set optim.skip_nonfinite=true to skip such batches.")


# The errors a training run raises, importable from here as before `demucs.checkpoint` existed.
__all__ = ["CheckpointError", "CheckpointWriteError", "NonFiniteLossError", "Solver",
           "TrainingParts", "TrainingSettings", "XPLockedError"]
