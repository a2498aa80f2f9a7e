"""Checking a training config before anything runs, and Dora's Hydra entry point without noise.

`dora run`, `dora grid` and `dora info` compose the Hydra config of an XP before training starts.
`CheckedHydraMain` (used through `checked_hydra_main`, in place of `dora.hydra_main`) turns what
can go wrong there into one message and exit status 2, without a Python traceback:
- an override Hydra refuses (an unknown key such as `foo=1`, an unknown group option such as
  `dset=notadset`, a malformed override);
- a value of the wrong type (`epochs=abc`, `optim.lr=abc`) or out of its range (`batch_size=0`,
  `epochs=-1`), an unknown `model=` name, or `weights` of another length than `dset.sources`
  (`check_config`).
It also silences Hydra's migration warnings and its working-directory warning, which concern
Hydra's own future defaults and not anything a Demucs user can act on.

Setting `HYDRA_FULL_ERROR=1` shows the full traceback of a composition error instead.
"""
from contextlib import contextmanager
import math
import os
import re
import sys
import typing as tp
import warnings

from dora.hydra import HydraMain
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Exit status of a call refused for its config (as argparse for a usage error).
CONFIG_ERROR_STATUS = 2

# Keys that must hold a whole number: (key, smallest allowed value).
INTEGER_KEYS: tp.Tuple[tp.Tuple[str, int], ...] = (
    ("epochs", 1), ("batch_size", 1), ("max_batches", 1), ("seed", -(1 << 63)),
    ("dset.samplerate", 1), ("dset.musdb_samplerate", 1), ("dset.channels", 1),
    ("dset.valid_samples", 1), ("misc.num_workers", 0), ("misc.num_prints", 0),
    ("test.workers", 0), ("test.every", 1), ("test.shifts", 0), ("save_every", 1),
    ("augment.remix.group_size", 1),
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


def _range_problems(cfg: DictConfig) -> tp.List[str]:
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


def _weights_problems(cfg: DictConfig) -> tp.List[str]:
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


def check_config(cfg: DictConfig, base: DictConfig, model_names: tp.Iterable[str]) -> None:
    """Raise `ConfigError` listing every value of `cfg` with the wrong type (against the
    defaults in `base`), out of its range, naming an unknown model, or a `weights` list that
    does not match `dset.sources`."""
    problems = _type_problems(cfg, base, "") + _range_problems(cfg) + _weights_problems(cfg)
    names = sorted(model_names)
    if "model" in cfg and cfg.model not in names:
        problems.append(f"model={cfg.model} is not a model: use one of {', '.join(names)}")
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


class CheckedHydraMain(HydraMain):
    """Dora's Hydra entry point, with the config checked when an XP is made from its argv
    (`check_config`) and Hydra's warnings about its future defaults silenced."""

    model_names: tp.Sequence[str] = ()
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
            check_config(xp.cfg, self._last_base, self.model_names)
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
                       **kwargs: tp.Any) -> tp.Callable[[tp.Callable], CheckedHydraMain]:
    """Like `dora.hydra_main`, giving a `CheckedHydraMain` that accepts `model=` among
    `model_names`."""
    def decorate(main: tp.Callable) -> CheckedHydraMain:
        entry = CheckedHydraMain(main, config_name=config_name, config_path=config_path,
                                 **kwargs)
        entry.model_names = tuple(model_names)
        return entry
    return decorate
