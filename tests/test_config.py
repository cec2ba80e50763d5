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


CPUINFO = "processor\t: 0\nvendor_id\t: {}\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: x\n\n"


@pytest.mark.parametrize("vendor, family, model, overlap, alias_guard", [
    ("AuthenticAMD", 0x19, 0x11, False, False),  # Zen 4 (Genoa): groups one after the other
    ("AuthenticAMD", 0x19, 0x01, True, False),   # Zen 3 (Milan)
    ("AuthenticAMD", 0x17, 0x01, True, True),    # Zen 1
    ("AuthenticAMD", 0x1A, 0x02, True, False),   # Zen 5
    ("GenuineIntel", 6, 0x8F, True, False),
])
def test_processor_choices_follow_cpuinfo(monkeypatch, tmp_path, vendor, family, model, overlap,
                                          alias_guard):
    """The per-processor choices read vendor, family and model from /proc/cpuinfo."""
    from fastbn import _config
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(vendor, family, model) * 2)
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        info if path == "/proc/cpuinfo" else path, *a, **k))
    _config._cpu_id.cache_clear()
    try:
        assert _config._cpu_id() == (vendor, family, model)
        assert _config.overlap_groups()  # training keeps the overlap everywhere
        assert _config.overlap_groups(backward=True) is overlap
        assert _config.streamed_store_alias_stall() is alias_guard
        assert _config.gradient_prefetch() is (vendor == "GenuineIntel")
    finally:
        monkeypatch.undo()
        _config._cpu_id.cache_clear()
