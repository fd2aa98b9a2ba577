"""Train state, optimizer and the jitted E4T pretraining step.

Only the trainable subtree (encoder, weight offsets, optional image-encoder parts) is differentiated
and carries optimizer state; the frozen subtree is a separate argument, never donated or updated. The
step is a pure function of arrays, so the distributed version only adds in/out shardings.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.objective import e4t_loss
from e4t_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1.6e-5   # the reference's
  warmup_steps: int = 0
  decay: str = 'constant'         # 'constant' | 'cosine'
  total_steps: int = 0            # for 'cosine'
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-2
  max_grad_norm: float = 1.0      # 0 disables clipping
  grad_accumulation: int = 1

  def __post_init__(self):
    if self.decay not in ('constant', 'cosine'):
      raise ConfigError(f'optimizer.decay {self.decay!r} must be "constant" or "cosine".')
    if self.decay == 'cosine' and self.total_steps <= self.warmup_steps:
      raise ConfigError('optimizer.total_steps must exceed warmup_steps for cosine decay.')
    if self.grad_accumulation < 1:
      raise ConfigError('optimizer.grad_accumulation must be >= 1.')


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  if config.decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1),
                                              config.total_steps)
  if config.warmup_steps:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
         optax.constant_schedule(config.learning_rate)], [config.warmup_steps])
  return optax.constant_schedule(config.learning_rate)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """AdamW with warm-up, optional cosine decay, global-norm clipping and gradient accumulation."""
  parts = []
  if config.max_grad_norm:
    parts.append(optax.clip_by_global_norm(config.max_grad_norm))
  parts.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay))
  tx = optax.chain(*parts)
  if config.grad_accumulation > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accumulation)
  return tx


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar
  trainable: Any           # encoder + weight offsets (+ trainable image-encoder parts)
  opt_state: Any


def create_train_state(model: model_lib.E4TModel, optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """(state, frozen params) for a model."""
  trainable, frozen = model_lib.split_params(model.params, model.config.trainable_patterns)
  state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable))
  return state, frozen


def make_train_step(modules: model_lib.E4TModules, optimizer: optax.GradientTransformation
                    ) -> Callable[[TrainState, dict, dict, jax.Array], tuple[TrainState, dict]]:
  """`train_step(state, frozen, batch, rng) -> (state, metrics)`, pure (jit it, donate `state`).

  `rng` is this step's key (the loop derives it, e.g. `fold_in(base, step)`), so a caller can also
  replay one fixed key, e.g. to overfit a batch.
  """
  def loss_fn(trainable, frozen, batch, rng):
    return e4t_loss(modules, model_lib.merge_params(trainable, frozen), batch, rng)

  def train_step(state: TrainState, frozen: dict, batch: dict, rng: jax.Array):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step
