"""e4t-jax: encoder-based domain tuning (E4T, Gal et al. 2023) for fast personalization, in JAX."""
__version__ = '0.1.0'

from e4t_jax.errors import E4TError  # noqa: F401
