"""fastbn: fast, accurate, multithreaded batch normalization for NumPy on the CPU."""
from ._api import batch_norm, batch_norm_backward
from ._backends import available_backends
from ._config import show_config
from ._inference import Moments, affine, fold_into_conv, fold_into_linear, moments, scale_shift
from ._layers import BatchNorm
from ._threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "Moments",
    "affine",
    "available_backends",
    "batch_norm",
    "batch_norm_backward",
    "fold_into_conv",
    "fold_into_linear",
    "get_num_threads",
    "moments",
    "scale_shift",
    "set_num_threads",
    "show_config",
]
