"""Bounds on user-given counts, shared by the CLI's argument checks and the library's (no jax import)."""

MAX_STEPS = 1000     # tuning, sampling and tuning-in-generate steps (the paper tunes 5-15; samplers use <= 1000)
MAX_VIEWS = 256      # views (paper) / noise draws (lite) per tuning step
MAX_SEED = 2**32 - 1  # seeds are uint32 PRNG seeds
