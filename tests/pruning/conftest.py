from hypothesis import HealthCheck, settings

# Every new array shape compiles a bisection loop; keep property tests small so the whole
# prune test directory stays well under a minute on two cores.
settings.register_profile(
    "prune", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("prune")
