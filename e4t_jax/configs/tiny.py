"""The tiny random E4T model on synthetic data: a CPU smoke run of the whole pipeline in minutes.

  e4t pretrain --config configs/tiny.py --workdir /tmp/e4t_tiny
"""
import ml_collections

from e4t_jax.configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model.base = 'tiny'
  config.encoder.hidden_dim = 32
  config.encoder.clip_layers = (-1, -2)
  config.offsets.rank = 2
  config.optimizer.learning_rate = 1e-4
  config.optimizer.global_batch_size = 8
  config.data.source = 'synthetic'
  config.data.synthetic_records = 64
  config.train.num_steps = 200
  config.train.log_every = 10
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 2
  return config
