"""The installation is what it claims: both fast backends load, OpenMP is on, show_config is true."""
import os

import pytest

import fastbn
from fastbn._config import config

# A build without a compiler or OpenMP is legitimate for users, but not for this project's CI:
# a missing backend would silently turn its tests into reference-vs-reference comparisons.
REQUIRED = os.environ.get("FASTBN_REQUIRED_BACKENDS", "cython,numba,numpy").split(",")


@pytest.mark.parametrize("name", REQUIRED)
def test_backend_is_available(name):
    assert name in fastbn.available_backends(), config()["backends unavailable"]


def test_openmp_is_on_and_reported():
    from fastbn import _kernels
    assert _kernels.OPENMP_ENABLED
    assert config()["openmp"] == "on"


def test_show_config_reports_the_facts(capsys):
    fastbn.show_config()
    printed = capsys.readouterr().out
    for key in ("fastbn", "backends available", "openmp", "threads", "numba threading layer",
                "cpu simd"):
        assert key in printed
    assert f"threads                {fastbn.get_num_threads()}" in printed
    assert fastbn.__version__ in printed
