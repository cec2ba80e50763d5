import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fastbn

settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

ALL_BACKENDS = fastbn.available_backends()
FAST_BACKENDS = [b for b in ALL_BACKENDS if b != "numpy"]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=FAST_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(
    reason="no fast backend built"))])
def fast_backend(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
