"""e4t-jax: encoder-based domain tuning (E4T) for fast text-to-image personalization, in JAX/Flax."""
from setuptools import find_packages, setup

RUNTIME = [
    # jax itself: `jax[cpu]`, `jax[tpu]` or `jax[cuda12]` at this version, chosen by the platform.
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'ml-collections==1.1.0',
    'grain==0.2.18',
    'tensorflow-datasets==4.9.10',
    'safetensors',
    'pillow',
    'numpy',
    'regex',
    'tqdm',
    'tensorboardX',  # TensorBoard event files without TensorFlow
]
# Torch side: only for parity tests, the PyTorch baseline benchmark and export checks.
TORCH = ['torch==2.13.0', 'diffusers', 'transformers']

setup(
    name='e4t-jax',
    version='0.1.0',
    description='Encoder-based domain tuning (E4T, Gal et al. 2023) for fast personalization, in JAX',
    python_requires='>=3.11',
    packages=find_packages(include=['e4t_jax', 'e4t_jax.*']),
    package_data={'e4t_jax': ['assets/**/*', 'assets/*/*']},
    include_package_data=True,
    install_requires=RUNTIME,
    extras_require={'torch': TORCH, 'test': TORCH + ['pytest', 'pytest-xdist'], 'tpu': ['libtpu==0.0.42.1']},
    entry_points={'console_scripts': ['e4t = e4t_jax.cli:main']},
)
