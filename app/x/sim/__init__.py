"""A local X API v2 simulator (Spaces and user lookups) with an admin API under /_sim."""

from app.x.sim.app import create_sim_app
from app.x.sim.server import RunningSim, running_sim, serve_sim
from app.x.sim.state import SimClock, SimError, SimSpace, SimState, SimUser

__all__ = [
    "RunningSim",
    "SimClock",
    "SimError",
    "SimSpace",
    "SimState",
    "SimUser",
    "create_sim_app",
    "running_sim",
    "serve_sim",
]
