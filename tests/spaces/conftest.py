from tests.discovery.conftest import sim, sim_state, sleep, xclient  # noqa: F401
