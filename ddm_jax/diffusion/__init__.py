from ddm_jax.diffusion.schedules import (Schedule, add_noise, make_schedule, schedule_from_config,
                                         to_x0_eps, training_target)
from ddm_jax.diffusion.samplers import SAMPLERS, make_denoiser, sample
