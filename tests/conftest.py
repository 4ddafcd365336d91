import os

from hypothesis import HealthCheck, settings

# Property tests state their own example counts; none has a deadline (CI machines vary).
settings.register_profile("doconv", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "doconv"))
