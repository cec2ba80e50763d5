"""Benchmarks for fastbn: one registry of cases (:mod:`fastbn.bench._registry`) read by the
comparison report (``python -m fastbn.bench``), the asv suite (``bench/``) and the
pytest-benchmark runs (``bench/pytest``)."""
from . import _registry as registry

__all__ = ["registry"]
