"""Model state utilities: constructor capture, packages (save/load), state copies and swaps."""
import functools
import inspect


def capture_init(init):
    """Decorate a model's `__init__` so the model remembers its constructor arguments.

    They are stored as `model._init_args_kwargs = (args, kwargs)`, from which a package can rebuild
    the model (`serialize_model` / `load_model`).
    """
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        self._init_args_kwargs = (args, kwargs)
        init(self, *args, **kwargs)

    __init__.__signature__ = inspect.signature(init)  # type: ignore[attr-defined]
    return __init__
