"""Samplers by contract name (``schemas.events.Sampler``) -> diffusers schedulers.

Each sampler is built from the model's own noise schedule (its scheduler config), so
a pretrained model keeps its betas, prediction type and timestep spacing. The config's
defaulted values are passed explicitly: diffusers otherwise lets the new class fall
back to *its* defaults for them, so a model built in memory and the same model saved
and loaded again would sample differently. A fresh scheduler is built for every
pipeline call: schedulers are stateful (timesteps, step index).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, get_args

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from schemas.events import Sampler

DEFAULT_SAMPLER: Sampler = "dpmpp_2m"

# Options that would change what a sampler *is*; set explicitly so a model's config
# (for example one saved with Karras sigmas) cannot turn dpmpp_2m into another sampler.
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
_NO_SIGMA_SCHEDULE = {"use_karras_sigmas": False, "use_exponential_sigmas": False}

_BUILDERS: dict[str, Callable[[Mapping[str, Any]], SchedulerMixin]] = {
    "dpmpp_2m": lambda cfg: DPMSolverMultistepScheduler.from_config(
        cfg, **_DPMPP_2M, **_NO_SIGMA_SCHEDULE, use_beta_sigmas=False
    ),
    "dpmpp_2m_karras": lambda cfg: DPMSolverMultistepScheduler.from_config(
        cfg, **_DPMPP_2M, use_karras_sigmas=True, use_exponential_sigmas=False
    ),
    "euler_a": lambda cfg: EulerAncestralDiscreteScheduler.from_config(cfg),
    "ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "unipc": lambda cfg: UniPCMultistepScheduler.from_config(cfg, **_NO_SIGMA_SCHEDULE),
}

SAMPLERS: tuple[str, ...] = get_args(Sampler)
assert set(SAMPLERS) == set(_BUILDERS), "every contract sampler needs a scheduler"


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A new scheduler for sampler ``name`` on the noise schedule ``base_config``."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}") from None
    # Drop "_use_default_values" and the like: every value becomes an explicit one.
    schedule = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    return builder(schedule)
