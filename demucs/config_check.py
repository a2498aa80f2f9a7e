"""Checking a training config before anything runs, and Dora's Hydra entry point without noise.

`dora run`, `dora grid` and `dora info` compose the Hydra config of an XP before training starts.
`CheckedHydraMain` (used through `checked_hydra_main`, in place of `dora.hydra_main`) turns what
can go wrong there into one message and exit status 2, without a Python traceback:
- an override Hydra refuses (an unknown key such as `foo=1`, an unknown group option such as
  `dset=notadset`, a malformed override);
- a value of the wrong type (`epochs=abc`, `optim.lr=abc`) or out of its range (`batch_size=0`,
  `epochs=-1`), an unknown `model=` name, `weights` of another length than `dset.sources`, a
  `batch_size` that does not split into the workers' batches and the remix groups, a `dset.shift`
  that leaves nothing of `dset.segment`, a `continue_from` / `continue_pretrained` that Hydra
  read as something else than a name, fine-tuning settings of the wrong kind (`lora.*`,
  `optim.freeze`, `continue_sources_init`) (`check_config`, one function per concern in `CHECKS`);
- then, on sound values, what only the model shows (`model_check`, the training's
  `train.model_problems`): a released model that contradicts the config, freeze patterns that
  match nothing, sources that cannot be remapped.
All of this runs in `get_xp`, before Dora makes the XP folder: a refused config leaves nothing.
It also silences Hydra's migration warnings and its working-directory warning, which concern
Hydra's own future defaults and not anything a Demucs user can act on.

Setting `HYDRA_FULL_ERROR=1` shows the full traceback of a composition error instead.
"""
from contextlib import contextmanager
from dataclasses import dataclass
import math
import os
from pathlib import Path
import re
import sys
import typing as tp
import warnings

from dora.hydra import HydraMain
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checkpoint import CHECKPOINT_NAME
from .lora import TARGETS

# Exit status of a call refused for its config (as argparse for a usage error).
CONFIG_ERROR_STATUS = 2

# Keys that must hold a whole number: (key, smallest allowed value).
INTEGER_KEYS: tp.Tuple[tp.Tuple[str, int], ...] = (
    ("epochs", 1), ("batch_size", 1), ("max_batches", 1), ("seed", -(1 << 63)),
    ("dset.samplerate", 1), ("dset.musdb_samplerate", 1), ("dset.channels", 1),
    ("dset.valid_samples", 1), ("misc.num_workers", 0), ("misc.num_prints", 0),
    ("test.workers", 0), ("test.every", 1), ("test.shifts", 0), ("save_every", 1),
    ("augment.remix.group_size", 1), ("lora.rank", 0),
)
# Keys that must hold a number greater than (strict) or at least (not strict) a bound.
NUMBER_KEYS: tp.Tuple[tp.Tuple[str, float, bool], ...] = (
    ("optim.lr", 0., True), ("dset.segment", 0., True), ("dset.shift", 0., False),
    ("optim.clip_grad", 0., False), ("optim.weight_decay", 0., False),
    ("model_segment", 0., True), ("test.overlap", 0., False),
)
# Probabilities: numbers from 0 to 1.
PROBABILITY_KEYS = ("augment.repitch.proba", "augment.remix.proba", "augment.scale.proba",
                    "augment.codec.proba", "augment.eq.proba")
_QUIET = (
    (r"(?s).*version_base", None),  # Hydra14MigrationWarning and the version_base notes
    (r"(?s).*Future Hydra versions will no longer change working directory", UserWarning),
)


class ConfigError(ValueError):
    """A training config that cannot run; the message lists every problem found."""


@dataclass(frozen=True)
class CheckContext:
    """What the checks know besides the config itself."""
    base: DictConfig  # the defaults (conf/config.yaml with the chosen groups)
    model_names: tp.Tuple[str, ...]  # the accepted values of `model`
    world_size: int = 1  # training workers the batch is split over
    xp_folder: tp.Optional[Path] = None  # the XP's own folder; its parent holds the other XPs


# The problems that only building the model shows (`train.model_problems`): (config, defaults).
ModelCheck = tp.Callable[[DictConfig, DictConfig], tp.List[str]]


@contextmanager
def quiet_hydra() -> tp.Iterator[None]:
    """Hide Hydra's warnings about its own future defaults (see the module docstring)."""
    with warnings.catch_warnings():
        for message, category in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=category or Warning)
        yield


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_problems(cfg: tp.Any, base: tp.Any, path: str) -> tp.List[str]:
    """Values of `cfg` whose type differs from the default in `base` (None defaults accept
    anything; a number accepts any number, the whole-number keys are checked apart)."""
    if isinstance(base, DictConfig) and isinstance(cfg, DictConfig):
        return [problem for key in cfg if key in base
                for problem in _type_problems(cfg[key], base[key], f"{path}{key}.")]
    name = path.rstrip(".")
    expected = None
    if base is None or cfg is None:
        return []
    if isinstance(base, bool):
        expected = "true or false" if not isinstance(cfg, bool) else None
    elif _is_number(base):
        expected = "a number" if not _is_number(cfg) else None
    elif isinstance(base, str):
        expected = "a text" if not isinstance(cfg, str) else None
    elif isinstance(base, ListConfig):
        expected = "a list, e.g. [1,2]" if not isinstance(cfg, ListConfig) else None
    if expected is None:
        return []
    return [f"{name}={cfg!r} must be {expected} (default: {base})"]


def _range_problems(cfg: DictConfig, context: CheckContext) -> tp.List[str]:
    problems = []
    for key, minimum in INTEGER_KEYS:
        value = OmegaConf.select(cfg, key)
        if not _is_number(value):  # absent, null, or a type problem reported apart
            continue
        if isinstance(value, float) and not value.is_integer():
            problems.append(f"{key}={value} must be a whole number")
        elif value < minimum:
            problems.append(f"{key}={value} must be at least {minimum}")
    for key in PROBABILITY_KEYS:
        value = OmegaConf.select(cfg, key)
        if _is_number(value) and not 0 <= value <= 1:
            problems.append(f"{key}={value} must be a probability, from 0 to 1")
    for key, bound, strict in NUMBER_KEYS:
        value = OmegaConf.select(cfg, key)
        if not _is_number(value):
            continue
        if not math.isfinite(value) or (value <= bound if strict else value < bound):
            relation = "greater than" if strict else "at least"
            problems.append(f"{key}={value} must be a finite number {relation} {bound:g}")
    return problems


def _weights_problems(cfg: DictConfig, context: CheckContext) -> tp.List[str]:
    """`weights` must give one loss weight per source of `dset.sources` (a shorter or longer
    list used to stop the first batch with a tensor size traceback)."""
    weights, sources = OmegaConf.select(cfg, "weights"), OmegaConf.select(cfg, "dset.sources")
    if not (isinstance(weights, ListConfig) and isinstance(sources, ListConfig)) \
            or len(weights) == len(sources):
        return []
    ones = ",".join(["1"] * len(sources))
    return [f"weights={list(weights)} has {len(weights)} value(s) but dset.sources="
            f"[{','.join(map(str, sources))}] has {len(sources)} stem(s): give one loss weight "
            f"per stem, e.g. weights=[{ones}]"]


def _model_problems(cfg: DictConfig, context: CheckContext) -> tp.List[str]:
    names = sorted(context.model_names)
    if "model" in cfg and cfg.model not in names:
        return [f"model={cfg.model} is not a model: use one of {', '.join(names)}"]
    return []


def _whole_number(cfg: DictConfig, key: str) -> tp.Optional[int]:
    """The value of `key` when it is a whole number of at least 1 (else None: absent, or a
    problem `_type_problems` / `_range_problems` report)."""
    value = OmegaConf.select(cfg, key)
    if not _is_number(value) or value < 1 or (isinstance(value, float) and not value.is_integer()):
        return None
    return int(value)


def _batch_problems(cfg: DictConfig, context: CheckContext) -> tp.List[str]:
    """`batch_size` is split evenly over the workers, and each worker's batch into groups of
    `augment.remix.group_size` when remixing (else the first batch stops in `Remix`)."""
    batch_size, workers = _whole_number(cfg, "batch_size"), context.world_size
    if batch_size is None:
        return []
    if batch_size % workers:
        return [f"batch_size={batch_size} must be divisible by the number of workers "
                f"({workers}): set batch_size to a multiple of {workers}"]
    group = _whole_number(cfg, "augment.remix.group_size")
    proba = OmegaConf.select(cfg, "augment.remix.proba")
    per_worker = batch_size // workers
    if group is None or not _is_number(proba) or proba <= 0 or per_worker % group == 0:
        return []
    each = f" ({per_worker} for each of {workers} workers)" if workers > 1 else ""
    return [f"batch_size={batch_size}{each} is not a multiple of augment.remix.group_size="
            f"{group}, the size of the groups whose stems are remixed: set batch_size to a "
            f"multiple of {group * workers}, or augment.remix.group_size to a divisor of "
            f"{per_worker}, or augment.remix.proba=0"]


def _shift_problems(cfg: DictConfig, context: CheckContext) -> tp.List[str]:
    """The random shift crops each training example to `dset.segment - dset.shift` seconds."""
    segment, shift = OmegaConf.select(cfg, "dset.segment"), OmegaConf.select(cfg, "dset.shift")
    if not (_is_number(segment) and _is_number(shift)) or shift < segment:
        return []
    return [f"dset.shift={shift} must be smaller than dset.segment={segment}: the random shift "
            "augmentation cuts training examples to segment - shift seconds, which would leave "
            "nothing to train on; lower dset.shift or raise dset.segment"]


def _as_number(name: str) -> tp.Optional[float]:
    """`name` as Hydra reads a number of digits with at most one `e`, else None."""
    if not name or not set(name) <= set("0123456789e") or name.count("e") > 1 \
            or name.startswith("e") or name.endswith("e"):
        return None
    return float(name)


def xp_signature(value: tp.Any, xps_folder: Path) -> str:
    """The XP signature meant by `continue_from=value`. Hydra reads a signature of digits with
    one `e` (e.g. 955717e8, the released htdemucs) as a float and one of digits alone as an
    integer: such a value is matched against the XP folders of `xps_folder` read the same way.
    A string is returned as it is."""
    if isinstance(value, str):
        return value
    if not _is_number(value):
        raise ValueError(f"continue_from={value!r} is not an XP signature: give the signature "
                         "of the XP to start from")
    matches = sorted(folder.name for folder in xps_folder.glob("*")
                     if folder.is_dir() and _as_number(folder.name) == value)
    if len(matches) == 1:
        return matches[0]
    found = (f"XP folders {', '.join(matches)} all match it" if matches
             else "no XP folder matches it")
    raise FileNotFoundError(
        f"continue_from was read as the number {value!r} (Hydra parses signatures such as "
        f"955717e8 as numbers) and {found} in {xps_folder}: quote the signature, e.g. "
        f"continue_from=\"'955717e8'\"")


def continued_signature(value: tp.Any, xp_folder: Path) -> tp.Optional[str]:
    """The signature of the XP that `continue_from=value` starts the XP in `xp_folder` from, or
    None. A number is matched with `xp_signature`; one that matches nothing is only an error
    when the XP starts afresh (with a checkpoint of its own it resumes, and `continue_from`
    is not used)."""
    if value is None or value == "":
        return None
    try:
        return xp_signature(value, xp_folder.parent)
    except FileNotFoundError:
        if (xp_folder / CHECKPOINT_NAME).exists():
            return None
        raise


def _continue_problems(cfg: DictConfig, context: CheckContext) -> tp.List[str]:
    """`continue_pretrained` names a model and `continue_from` an XP, not both: Hydra reads a
    signature such as 955717e8 as a number, which only `continue_from` can match (against the
    XPs)."""
    problems = []
    pretrained = OmegaConf.select(cfg, "continue_pretrained")
    if pretrained is not None and not isinstance(pretrained, str):
        problems.append(
            f"continue_pretrained={pretrained!r} was read as a {type(pretrained).__name__} "
            "(Hydra parses signatures such as 955717e8 as numbers): quote the name, e.g. "
            "continue_pretrained=\"'955717e8'\"")
    value = OmegaConf.select(cfg, "continue_from")
    if pretrained and value not in (None, ""):
        problems.append(f"continue_pretrained={pretrained} and continue_from={value} both name "
                        "where the XP starts: keep one")
    if value is not None and not isinstance(value, str) and not _is_number(value):
        problems.append(f"continue_from={value!r} is not an XP signature: give the signature "
                        "of the XP to start from")
    elif _is_number(value) and context.xp_folder is not None:
        try:
            continued_signature(value, context.xp_folder)
        except FileNotFoundError as error:
            problems.append(str(error))
    return problems


def _types_against_base(cfg: DictConfig, context: CheckContext) -> tp.List[str]:
    return _type_problems(cfg, context.base, "")


def _lora_problems(cfg: DictConfig, context: CheckContext) -> tp.List[str]:
    """`lora.rank` a whole number (0: off), `lora.alpha` null or a positive number,
    `lora.targets` kinds of layers `demucs.lora` adapts; adapters cannot be merged into a
    quantized model (`quant.diffq`, `quant.qat`)."""
    problems = []
    rank, alpha = OmegaConf.select(cfg, "lora.rank"), OmegaConf.select(cfg, "lora.alpha")
    if alpha is not None and (not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0):
        problems.append(f"lora.alpha={alpha!r} must be a number greater than 0, or null for "
                        "alpha = lora.rank")
    targets = OmegaConf.select(cfg, "lora.targets")
    if isinstance(targets, ListConfig) and (not targets or not set(targets) <= set(TARGETS)):
        problems.append(f"lora.targets={list(targets)} must be a non-empty list of "
                        f"{', '.join(TARGETS)}")
    quantized = [key for key in ("quant.diffq", "quant.qat") if OmegaConf.select(cfg, key)]
    if _is_number(rank) and rank > 0 and quantized:
        problems.append(f"lora.rank={rank} cannot be combined with {quantized[0]}: adapters are "
                        "merged into plain weights, which a quantized model does not have; "
                        f"set lora.rank=0 or {quantized[0]}=null")
    return problems


def _finetune_problems(cfg: DictConfig, context: CheckContext) -> tp.List[str]:
    """`optim.freeze` a list of parameter-name patterns; `continue_sources_init` a mapping of
    new source -> checkpoint source, used with `continue_pretrained` only."""
    problems = []
    freeze = OmegaConf.select(cfg, "optim.freeze")
    if isinstance(freeze, ListConfig) and not all(isinstance(item, str) for item in freeze):
        problems.append(f"optim.freeze={list(freeze)} must list parameter-name patterns, e.g. "
                        "optim.freeze=[encoder.*,crosstransformer.*]")
    init = OmegaConf.select(cfg, "continue_sources_init")
    if init is None:
        return problems
    if not isinstance(init, DictConfig) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in init.items()):
        problems.append(f"continue_sources_init={init!r} must map each new source to the "
                        "checkpoint source it starts from, e.g. "
                        "continue_sources_init={guitar:other,piano:other}")
    elif not OmegaConf.select(cfg, "continue_pretrained"):
        problems.append("continue_sources_init is set without continue_pretrained: it says how "
                        "the new sources of a released model start; name the model with "
                        "continue_pretrained=NAME")
    return problems


# Every check of a training config, each giving the problems of one concern (one line each,
# naming the key, its value and what to do). A new group of keys adds its function here.
Check = tp.Callable[[DictConfig, CheckContext], tp.List[str]]
CHECKS: tp.Tuple[Check, ...] = (
    _types_against_base, _range_problems, _weights_problems, _model_problems, _batch_problems,
    _shift_problems, _continue_problems, _lora_problems, _finetune_problems)


def check_config(cfg: DictConfig, base: DictConfig, model_names: tp.Iterable[str],
                 world_size: int = 1, xp_folder: tp.Optional[Path] = None,
                 model_check: tp.Optional[ModelCheck] = None) -> None:
    """Raise `ConfigError` listing every problem that `CHECKS` find in `cfg`: values of the
    wrong type (against the defaults in `base`) or out of range, an unknown model (not in
    `model_names`), a `batch_size` that `world_size` workers or the remix groups cannot split,
    a signature Hydra read as a number that matches no XP next to `xp_folder`, ...

    When they find none, `model_check` (the training's `model_problems`) reports what only the
    model shows: a released model that contradicts the config, freeze patterns matching
    nothing... It runs last, on values known to be sound, as it may load and build a model."""
    context = CheckContext(base=base, model_names=tuple(model_names), world_size=world_size,
                           xp_folder=xp_folder)
    problems = [problem for check in CHECKS for problem in check(cfg, context)]
    if not problems and model_check is not None:
        problems = model_check(cfg, base)
    if problems:
        raise ConfigError("; ".join(problems))


def _composition_message(error: Exception) -> str:
    """Hydra's message on one line, without its config search path listing."""
    text = str(error).split("Config search path")[0]
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown:
        return (f"unknown key {unknown.group(1)!r} (check its spelling; `+KEY=VALUE` adds a key "
                "that the config does not have)")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _refuse(message: str) -> tp.NoReturn:
    print(f"demucs.train: invalid config: {message}\n(keys and defaults: conf/config.yaml; "
          "groups: conf/dset, conf/svd, conf/variant; nothing was run)", file=sys.stderr)
    raise SystemExit(CONFIG_ERROR_STATUS)


def _world_size() -> int:
    """The number of training workers, as Dora will start them (1 outside `dora run -d`)."""
    from dora.distrib import get_distrib_spec
    return get_distrib_spec().world_size


class CheckedHydraMain(HydraMain):
    """Dora's Hydra entry point, with the config checked when an XP is made from its argv
    (`check_config`, before Dora makes its folder) and Hydra's warnings about its future
    defaults silenced."""

    model_names: tp.Sequence[str] = ()
    model_check: tp.Optional[ModelCheck] = None
    _last_base: tp.Optional[DictConfig] = None  # the base config the last `get_xp` composed

    def get_xp(self, argv: tp.Sequence[str]):
        try:
            xp = super().get_xp(argv)
        except (HydraException, OmegaConfBaseException) as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _refuse(_composition_message(error))
        assert self._last_base is not None
        try:
            check_config(xp.cfg, self._last_base, self.model_names, _world_size(),
                         Path(xp.folder), self.model_check)
        except ConfigError as error:
            _refuse(str(error))
        return xp

    def _get_config(self, overrides: tp.List[str] = []) -> DictConfig:
        with quiet_hydra():
            return super()._get_config(overrides)

    def _get_config_groups(self) -> tp.List[str]:
        with quiet_hydra():
            return super()._get_config_groups()

    def _get_base_config(self, overrides: tp.List[str] = []):
        with quiet_hydra():
            base, delta = super()._get_base_config(overrides)
        self._last_base = base
        return base, delta

    def _main(self):
        with quiet_hydra():
            return super()._main()


def checked_hydra_main(config_name: str, config_path: str, model_names: tp.Sequence[str],
                       model_check: tp.Optional[ModelCheck] = None,
                       **kwargs: tp.Any) -> tp.Callable[[tp.Callable], CheckedHydraMain]:
    """Like `dora.hydra_main`, giving a `CheckedHydraMain` that accepts `model=` among
    `model_names` and runs `model_check` last (see `check_config`)."""
    def decorate(main: tp.Callable) -> CheckedHydraMain:
        entry = CheckedHydraMain(main, config_name=config_name, config_path=config_path,
                                 **kwargs)
        entry.model_names = tuple(model_names)
        entry.model_check = model_check
        return entry
    return decorate
