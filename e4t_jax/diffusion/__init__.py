"""Noise schedule (training forward process) and few-step samplers with classifier-free guidance."""
from e4t_jax.diffusion.samplers import (SAMPLERS, SamplerConfig, classifier_free_guidance,  # noqa: F401
                                        guided_denoise_fn, make_timesteps, sample)
from e4t_jax.diffusion.schedule import (NoiseSchedule, add_noise, predicted_x0_and_eps,  # noqa: F401
                                        sample_timesteps, snr, training_target, velocity)
