"""Small helpers shared by the models, the solver and the separation code."""
from collections import defaultdict
import contextlib
from contextlib import contextmanager
import functools
import inspect
import math
import os
import signal
import sys
import threading
import tempfile
import typing as tp

import torch
from torch.nn import functional as F
from torch.utils.data import Subset


def unfold(a: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """View the last dimension of `a` as overlapping frames.

    The input `[*, T]` is zero padded on the right so that every sample falls in a frame, and the
    result is `[*, frames, kernel_size]` with `frames = ceil(T / stride)`. No copy of the frames
    is made.
    """
    *shape, length = a.shape
    n_frames = math.ceil(length / stride)
    target = (n_frames - 1) * stride + kernel_size
    a = F.pad(a, (0, target - length))
    strides = list(a.stride())
    if strides[-1] != 1:
        raise ValueError("unfold needs the last dimension to be contiguous")
    strides = strides[:-1] + [stride, 1]
    return a.as_strided([*shape, n_frames, kernel_size], strides)


def center_trim(tensor: torch.Tensor, reference: tp.Union[torch.Tensor, int]) -> torch.Tensor:
    """Crop the last dimension of `tensor` to the length of `reference`, keeping the centre.

    When the excess is odd, one more sample is removed at the end than at the start.
    """
    ref_size = reference.size(-1) if isinstance(reference, torch.Tensor) else reference
    delta = tensor.size(-1) - ref_size
    if delta < 0:
        raise ValueError(f"tensor must be at least as long as the reference, got delta={delta}")
    if delta:
        tensor = tensor[..., delta // 2:-(delta - delta // 2)]
    return tensor


def pull_metric(history: tp.List[dict], name: str) -> list:
    """Values of the dotted metric `name` (e.g. `valid.loss`) for every epoch of `history`."""
    out = []
    for metrics in history:
        value = metrics
        for part in name.split("."):
            value = value[part]
        out.append(value)
    return out


def EMA(beta: float = 1) -> tp.Callable[..., tp.Dict[str, float]]:
    """Running (optionally exponentially decayed) weighted average of metric dictionaries.

    Returns an `update(metrics, weight=1)` function that folds in one dictionary and returns the
    current averages. With `beta=1` this is the plain weighted mean.
    """
    totals: tp.Dict[str, float] = defaultdict(float)
    weights: tp.Dict[str, float] = defaultdict(float)

    def update(metrics: dict, weight: float = 1) -> tp.Dict[str, float]:
        for key, value in metrics.items():
            totals[key] = totals[key] * beta + weight * float(value)
            weights[key] = weights[key] * beta + weight
        return {key: total / weights[key] for key, total in totals.items()}

    return update


def capture_init(init: tp.Callable[..., None]) -> tp.Callable[..., None]:
    """Decorate a model's `__init__` so the model remembers its constructor arguments.

    They are stored as `model._init_args_kwargs = (args, kwargs)`, from which a package can rebuild
    the model (`states.serialize_model` / `states.load_model`). It lives here, below the models,
    so that the models need nothing of the package layer; `demucs.states.capture_init` is the same
    function.
    """
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        self._init_args_kwargs = (args, kwargs)
        init(self, *args, **kwargs)

    __init__.__signature__ = inspect.signature(init)  # type: ignore[attr-defined]
    return __init__


def fatal(*args: tp.Any) -> tp.NoReturn:
    """Print `args` to stderr and exit with status 1 (as Demucs 4.1's `utils.fatal`, which command
    line tools use instead of importing dora's)."""
    print(*args, file=sys.stderr)
    sys.exit(1)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (like KeyboardInterrupt for Ctrl-C) so that the
    cleanups of the code it interrupts run."""


def _raise_terminated(signum: int, frame: tp.Any) -> None:
    raise Terminated()


# Exit status of a process stopped by a signal, as shells report it.
INTERRUPT_STATUS = {KeyboardInterrupt: 128 + signal.SIGINT, Terminated: 128 + signal.SIGTERM}


@contextmanager
def exit_on_interrupt(command: str, what_is_kept: str, immediate: bool) -> tp.Iterator[None]:
    """Run the block so that Ctrl-C (SIGINT) or SIGTERM end the command with one line on stderr
    and status 130 or 143, after the block's own cleanups (temporary files) ran.

    Args:
        command: the command's name, which starts the line.
        what_is_kept: what the user still has (e.g. "stems of finished tracks are kept").
        immediate: leave through `os._exit`, without waiting for worker threads still busy with
            a segment (they would delay the exit by a whole segment); for a process's main
            function only. Otherwise `SystemExit` is raised.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        yield
    except (KeyboardInterrupt, Terminated) as interrupt:
        status = INTERRUPT_STATUS[type(interrupt)]
        name = "interrupted" if isinstance(interrupt, KeyboardInterrupt) else "terminated"
        print(f"\n{command}: {name}; {what_is_kept}.", file=sys.stderr)
        if immediate:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        raise SystemExit(status) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def sizeof_fmt(num: float, suffix: str = "B") -> str:
    """Human readable size with binary prefixes, e.g. `1.5MiB`."""
    for unit in ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi"]:
        if abs(num) < 1024.0:
            return f"{num:3.1f}{unit}{suffix}"
        num /= 1024.0
    return f"{num:.1f}Yi{suffix}"


@contextmanager
def temp_filenames(count: int, delete: bool = True) -> tp.Iterator[tp.List[str]]:
    """Yield `count` fresh temporary file names, removed on exit when `delete`."""
    names = []
    try:
        for _ in range(count):
            handle, name = tempfile.mkstemp()
            os.close(handle)
            names.append(name)
        yield names
    finally:
        if delete:
            for name in names:
                if os.path.exists(name):
                    os.remove(name)


def random_subset(dataset, max_samples: int, seed: int = 42):
    """A reproducible random subset of at most `max_samples` items of `dataset`."""
    if max_samples >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(dataset), generator=generator)
    return Subset(dataset, perm[:max_samples].tolist())


class DummyPoolExecutor:
    """Stand-in for `concurrent.futures` executors that runs each task when its result is
    asked for."""

    class DummyResult:
        def __init__(self, func, *args, **kwargs):
            self.func = func
            self.args = args
            self.kwargs = kwargs

        def result(self):
            return self.func(*self.args, **self.kwargs)

        def cancel(self) -> bool:
            return True

    def __init__(self, workers: int = 0):
        self.workers = workers

    def submit(self, func, *args, **kwargs) -> "DummyPoolExecutor.DummyResult":
        return DummyPoolExecutor.DummyResult(func, *args, **kwargs)

    def shutdown(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        return


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: tp.Optional[str]) -> None:
    """Refuse an `amp` setting other than None (float32), "bf16" or "fp16"."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be bf16, fp16 or None (float32), got {amp!r}")


def autocast(device: tp.Union[str, torch.device], amp: tp.Optional[str]) -> tp.ContextManager:
    """Context that runs a model in mixed precision on `device`: `amp` "bf16" or "fp16" selects
    `torch.autocast` with that dtype, None keeps float32 (a no-op context).

    Autocast state belongs to the thread that enters it, so enter it where the model runs.
    """
    check_amp(amp)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])
