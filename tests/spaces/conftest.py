from tests.discovery.conftest import api, sim, sim_state, sleep, xclient  # noqa: F401
