import jax
import pytest


@pytest.fixture(autouse=True)
def _require_eight_devices():
    if jax.device_count() < 8:
        pytest.fail(
            "multi-device checks need XLA_FLAGS=--xla_force_host_platform_device_count=8 set "
            "before jax is imported; run them through tests/test_multidevice.py"
        )
