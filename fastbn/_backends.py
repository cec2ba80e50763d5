"""The registry of backends: a name maps to a module implementing the backend interface
described in :mod:`fastbn._reference`."""
from __future__ import annotations

import importlib
from types import ModuleType

# In order of preference for backend=None.
_MODULES = {
    "cython": "fastbn._kernels",
    "numba": "fastbn._numba_kernels",
    "numpy": "fastbn._reference",
}
_INTERFACE = ("moments", "normalize", "train_forward", "backward")
_loaded: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
        missing = [f for f in _INTERFACE if not hasattr(module, f)]
        if missing:
            raise ImportError(f"{_MODULES[name]} lacks {', '.join(missing)}")
    except ImportError as exc:
        _errors[name] = str(exc)
        return None
    _loaded[name] = module
    return module


def available_backends() -> list[str]:
    """Names of the backends that load on this machine, fastest first.

    Examples
    --------
    >>> import fastbn
    >>> "numpy" in fastbn.available_backends()
    True
    """
    return [name for name in _MODULES if _load(name) is not None]


def unavailable_backends() -> dict[str, str]:
    """Backends that do not load, with the reason."""
    available_backends()
    return dict(_errors)


def get_backend(name: str | None) -> ModuleType:
    """The backend module for `name`; None picks the fastest available one."""
    if name is None:
        for candidate in _MODULES:
            module = _load(candidate)
            if module is not None:
                return module
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str or None, got {type(name).__name__}")
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {sorted(_MODULES)} or None, got {name!r}")
    module = _load(name)
    if module is None:
        raise ValueError(f"backend {name!r} is not available here: {_errors[name]}")
    return module
