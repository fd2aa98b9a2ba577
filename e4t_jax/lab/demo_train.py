"""`e4t demo-train`: trains the embedded demo model from scratch on the synthetic face domain.

Everything the demo needs is trained here, on 2 CPU cores, deterministically for a seed, with the same
architecture classes as Stable Diffusion (only the sizes differ):

  1. pool     render a fixed pool of captioned training records (`data.synthetic`, train identities only)
  2. vae      an AutoencoderKL, 64x64 RGB -> 16x16x4 latents (L2 + L1 + small KL); its latent scale is
              measured afterwards (SD's 0.18215 is the same kind of number)
  3. vision   a CLIP vision transformer, pretrained by predicting the generator's attributes (like a
              supervised ViT); E4T reads its hidden states
  4. t2i      the U-Net and CLIP text encoder, jointly, from scratch: epsilon-prediction on the VAE
              latents, EMA weights. 3 captions in 4 also put the identity into words ("a small round
              lilac face with emerald dot eyes, ... on a blue background"), as Stable Diffusion's
              captions describe looks: the base model learns to draw faces it is told about, and the
              word-embedding space learns to hold identities, which is what E4T and textual inversion
              build on. Captions are dropped 10% of the time (classifier-free guidance). Prompts for
              personalization and evaluation never describe the identity.
     t2i-roundK  (optional, `DemoTrainConfig.t2i_rounds`) continuation rounds of stage 4: each starts from the
              previous text-to-image weights as the model ships them (float16), with a fresh AdamW, so that
              a shipped model is the checkpoint of a longer CPU training spread over sessions
              (`--base-from MODEL` continues a model folder without retraining its stages)
  5. e4t      E4T domain pretraining on top (`train.loop.train_and_evaluate`, the same code as a pod run):
              the encoder and the weight offsets, prompts = the images' captions with the placeholder
  6. readout  the evaluation judge (`e4t_jax.evaluate`), a separate CNN trained on other records

Each stage writes its result under `workdir/stages/` when it finishes, and checkpoints its whole
training state every 250 steps while it runs; running the command again skips finished stages and
resumes the interrupted one (bit-equal to an uninterrupted run), so an interruption loses minutes.
The model folder is written to `workdir/model/` (and, with `--install`, copied into the package as
`e4t_jax/assets/demo_model/`, which `e4t_jax.load_demo()` reads).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn
from flax import traverse_util

from e4t_jax.fileio import atomic_write_bytes, read_safetensors, write_safetensors
from e4t_jax.convert.pipeline import SD1_SCHEDULER_CONFIG, StableDiffusion
from e4t_jax.data import synthetic
from e4t_jax.diffusion import schedule as schedule_lib
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.e4t.offsets import OffsetsConfig
from e4t_jax.errors import ConfigError, E4TError
from e4t_jax.models import clip as clip_lib
from e4t_jax.models import layers
from e4t_jax.models import unet as unet_lib
from e4t_jax.models.clip import (CLIPTextConfig, CLIPTextTransformer, CLIPVisionConfig, CLIPVisionTransformer,
                                 clip_preprocess)
from e4t_jax.models.layers import host_init
from e4t_jax.models.unet import CROSS_ATTN_DOWN, CROSS_ATTN_UP, UNet, UNetConfig
from e4t_jax.models.vae import AutoencoderKL, VAEConfig
from e4t_jax.progress import progress_bar
from e4t_jax.models.tokenizer import CLIPTokenizer

STAGES = ('pool', 'vae', 'vision', 't2i', 'e4t', 'readout')
SCHEDULES = ('cosine', 'constant')
TEXT_LENGTH = 40  # tokens; the longest caption (identity in words + context) is 33 with bos/eos


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class T2IRound:
  """A continuation round of the text-to-image stage (issue 17: CPU training that goes further across
  sessions). It starts from the previous text-to-image weights rounded to float16 (as the model ships them:
  a shipped model is the round's whole starting point) and the pool encoded by the float16 VAE, with a fresh
  AdamW (warm-up, then cosine decay to 5% over `steps`), the EMA, and the next `steps` batches and EMA
  steps of the stage's stream."""
  steps: int
  lr: float
  min_snr_gamma: float = 0.0  # `DemoTrainConfig.t2i_min_snr_gamma` for this round
  cpu_attention: str = 'xla_deferred'  # what attention 'auto' runs on CPU in this round (~1.5x faster than 'xla')

  @classmethod
  def parse(cls, text: str) -> 'T2IRound':
    """'STEPS:LR[:GAMMA]' (the CLI's --t2i-round), validated."""
    parts = text.split(':')
    try:
      if not 2 <= len(parts) <= 3:
        raise ValueError
      round_ = cls(int(parts[0]), float(parts[1]), float(parts[2]) if len(parts) == 3 else 0.0)
    except ValueError:
      raise ConfigError(f'--t2i-round {text!r}: expected STEPS:LR[:MIN_SNR_GAMMA], e.g. 6000:2e-4:1.') from None
    round_.validate()
    return round_

  def validate(self) -> None:
    if self.steps < 1 or not self.lr > 0 or self.min_snr_gamma < 0:
      raise ConfigError(f'a text-to-image round needs steps >= 1, lr > 0 and min_snr_gamma >= 0, got {self}.')
    if self.cpu_attention not in ('xla', 'xla_deferred'):
      raise ConfigError(f"a round's cpu_attention must be 'xla' or 'xla_deferred', got {self.cpu_attention!r}.")


@dataclasses.dataclass(frozen=True)
class DemoTrainConfig:
  """Sizes and schedules of `e4t demo-train` (the defaults are the shipped model's)."""
  seed: int = 0
  pool_size: int = 12_000
  vae_steps: int = 1_500
  vae_batch: int = 16
  vae_crop: int = 32
  vae_lr: float = 2e-3
  vae_kl_weight: float = 1e-4
  # 3,000 since 2026-12-08: at 600 steps the tower's features carried skin colour and little else (a linear
  # probe per attribute: head at chance; scripts/vision_probe.py), so no encoder on top could read an identity.
  vision_steps: int = 3_000
  vision_batch: int = 64
  vision_lr: float = 1e-3
  t2i_steps: int = 4_000
  t2i_batch: int = 24
  t2i_lr: float = 5e-4
  # 'cosine': warm-up, then cosine decay over t2i_steps (the shipped model). 'constant': warm-up, then
  # the peak rate (with the EMA): the schedule does not depend on the step count, so a time limit
  # (`run(time_limit_s=...)`) may end the stage early as a finished stage, with the steps it ran recorded.
  t2i_schedule: str = 'cosine'
  t2i_dtype: str = 'float32'  # the U-Net's compute dtype in this stage (params and loss stay float32)
  # Min-SNR-γ weighting of the text-to-image loss (`schedule.min_snr_weight`): ε-prediction's plain MSE weighs the
  # content stage (high noise: layout, colours, which the captions decide) ~100x less than the clean-up stage.
  # 0: the plain MSE (the shipped model).
  t2i_min_snr_gamma: float = 0.0
  # Continuation rounds after the stage (`T2IRound`). The shipped model has two, each 6,000 steps at 5e-4 with
  # min-SNR-1 weighting (2026-12-07 and 2026-12-08, docs/reproduction.md), each from the previous float16 weights.
  t2i_rounds: tuple[T2IRound, ...] = (T2IRound(6_000, 5e-4, 1.0), T2IRound(6_000, 5e-4, 1.0))
  caption_dropout: float = 0.1
  identity_caption_rate: float = 0.75  # base captions that also put the identity into words
  ema_decay: float = 0.998
  e4t_steps: int = 1_500
  e4t_batch: int = 16
  e4t_lr: float = 1e-3
  e4t_data_workers: int = 0  # grain processes rendering the E4T stage's records (0: in the training process)
  # λ_emb on the encoder's offset. The paper's 0.01 held f to a third of a word's norm here, where the diffusion
  # loss itself is ~0.04 (skin colour 0.54 vs 0.85 at 0.001, prompt fidelity unchanged: docs/reproduction.md).
  e4t_lambda_embedding: float = 0.001
  e4t_min_snr_gamma: float = 1.0  # min-SNR-γ weighting of the E4T stage's diffusion loss (0: the paper's MSE)
  e4t_loss_mask: bool = True  # weight the E4T stage's diffusion loss by the face mask (the paper's faces: no)
  readout_steps: int = 3_000
  readout_pool: int = 16_000
  unet_channels: tuple[int, ...] = (48, 96)
  checkpoint_every: int = 250  # steps between mid-stage checkpoints
  # What attention 'auto' runs on CPU (`layers.auto_cpu_attention`): 'xla', jax.nn's reference, is what the
  # shipped model was trained with (so that a run reproduces it); 'xla_deferred' trains the text-to-image
  # stage ~1.5x faster on XLA:CPU (`e4t bench demo-train`), for the next model.
  cpu_attention: str = 'xla'

  @classmethod
  def smoke(cls, **overrides) -> 'DemoTrainConfig':
    """A seconds-long run of every stage (tests)."""
    values = dict(pool_size=64, vae_steps=3, vae_batch=4, vae_crop=16, vision_steps=3, vision_batch=8, t2i_steps=3, t2i_batch=4,
                  t2i_rounds=(), e4t_steps=2, e4t_batch=2, readout_steps=3, readout_pool=32, unet_channels=(16, 32))
    values.update(overrides)
    return cls(**values)

  @classmethod
  def accelerator(cls, *, smoke: bool = False, **overrides) -> 'DemoTrainConfig':
    """One GPU's sizes (`launch/demo_train_gpu.sh`, issue 17): the same stages and code, a 5x larger
    pool, larger batches, the U-Net in bfloat16, and a text-to-image stage with a constant rate after
    warm-up, run for as many steps as the time limit leaves (up to t2i_steps; the count it ran is
    recorded), with min-SNR-1 loss weighting (the CPU continuation probes' best recipe, docs/reproduction.md).
    smoke: the smoke sizes with the accelerator's schedule, dtype and loss (tests, CPU)."""
    values = dict(t2i_schedule='constant', t2i_dtype='bfloat16', t2i_min_snr_gamma=1.0, t2i_rounds=(),
                  ema_decay=0.999, e4t_data_workers=2)
    if not smoke:
      values.update(pool_size=64_000, vae_steps=3_000, vae_batch=64, vision_steps=1_500, vision_batch=128,
                    t2i_steps=200_000, t2i_batch=512, t2i_lr=1e-3, e4t_steps=1_000, e4t_batch=32,
                    e4t_data_workers=8, checkpoint_every=2_000)
    values.update(overrides)
    return cls.smoke(**values) if smoke else cls(**values)

  def validate(self) -> None:
    if self.cpu_attention not in ('xla', 'xla_deferred'):
      raise ConfigError(f"cpu_attention must be 'xla' or 'xla_deferred', got {self.cpu_attention!r}.")
    if self.t2i_schedule not in SCHEDULES:
      raise ConfigError(f't2i_schedule must be one of {SCHEDULES}, got {self.t2i_schedule!r}.')
    if self.t2i_dtype not in ('float32', 'bfloat16'):
      raise ConfigError(f"t2i_dtype must be 'float32' or 'bfloat16', got {self.t2i_dtype!r}.")
    if self.t2i_min_snr_gamma < 0:
      raise ConfigError(f't2i_min_snr_gamma must be >= 0 (0: the plain loss), got {self.t2i_min_snr_gamma}.')
    for round_ in self.t2i_rounds:
      round_.validate()
    if self.checkpoint_every < 1:
      raise ConfigError(f'checkpoint_every must be >= 1, got {self.checkpoint_every}.')
    if self.e4t_steps < 1 or self.e4t_batch < 1 or not self.e4t_lr > 0 or self.e4t_lambda_embedding < 0 \
        or self.e4t_min_snr_gamma < 0 or self.e4t_data_workers < 0:
      raise ConfigError('the E4T stage needs steps, batch >= 1, lr > 0 and lambda_embedding, min_snr_gamma, '
                        f'data_workers >= 0; got steps={self.e4t_steps}, batch={self.e4t_batch}, lr={self.e4t_lr}, '
                        f'lambda_embedding={self.e4t_lambda_embedding}, min_snr_gamma={self.e4t_min_snr_gamma}, '
                        f'data_workers={self.e4t_data_workers}.')


def with_overrides(config: DemoTrainConfig, texts: list[str], *, prefix: str = '',
                   flag: str = 'override') -> DemoTrainConfig:
  """`config` with fields set from 'NAME=VALUE' texts, validated. NAME is a DemoTrainConfig field (its `prefix`
  may be left out; only fields with the prefix are accepted); VALUE is parsed as the field's current type
  (bools: true/false/1/0). `flag` names the source in errors (e.g. '--e4t-set')."""
  fields = {f.name.removeprefix(prefix): f.name for f in dataclasses.fields(DemoTrainConfig)
            if f.name.startswith(prefix) and isinstance(getattr(config, f.name), (int, float, str))}
  values = {}
  for text in texts:
    name, sep, value = text.partition('=')
    name = name.strip().removeprefix(prefix)
    if not sep or name not in fields:
      raise ConfigError(f'{flag} {text!r}: expected NAME=VALUE with NAME one of {sorted(fields)}.')
    kind = type(getattr(config, fields[name]))
    try:
      if kind is bool:
        if value.lower() not in ('true', 'false', '1', '0'):
          raise ValueError(value)
        parsed = value.lower() in ('true', '1')
      else:
        parsed = kind(value)
    except ValueError:
      raise ConfigError(f'{flag} {text!r}: {value!r} is not a {kind.__name__}.') from None
    values[fields[name]] = parsed
  config = dataclasses.replace(config, **values)
  try:
    config.validate()
  except ConfigError as e:
    raise ConfigError(f'{flag} {" ".join(texts)}: {e}') from None
  return config


def with_e4t_settings(config: DemoTrainConfig, settings: list[str]) -> DemoTrainConfig:
  """`config` with E4T-stage fields set from 'NAME=VALUE' texts (the CLI's --e4t-set; NAME is a
  DemoTrainConfig field without its 'e4t_' prefix, e.g. 'steps=2000', 'min_snr_gamma=1', 'loss_mask=true')."""
  return with_overrides(config, settings, prefix='e4t_', flag='--e4t-set')


def write_params(path: Path, params: Any) -> None:
  """A params tree as one safetensors file of '/'-joined names (`read_params` reads it back)."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  write_safetensors(path, {k: np.asarray(v) for k, v in flat.items()})


def read_params(path: Path) -> Any:
  return traverse_util.unflatten_dict({k: np.array(v) for k, v in read_safetensors(path).items()}, sep='/')


def load_pool(path: Path) -> dict[str, np.ndarray]:
  """A data pool saved by `run` (WORKDIR/stages/pool.npz)."""
  with np.load(path) as stored:
    return {k: stored[k] for k in stored.files}


def architecture(config: DemoTrainConfig) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, CLIPVisionConfig]:
  """The demo model's networks: Stable Diffusion's and CLIP's classes at toy sizes."""
  c0, c1 = config.unet_channels
  unet = UNetConfig(sample_size=16, in_channels=4, out_channels=4, down_block_types=(CROSS_ATTN_DOWN,) * 2,
                    up_block_types=(CROSS_ATTN_UP,) * 2, block_out_channels=(c0, c1), layers_per_block=1,
                    norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4)
  vae = VAEConfig(down_block_types=('DownEncoderBlock2D',) * 3, up_block_types=('UpDecoderBlock2D',) * 3,
                  block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=synthetic.IMAGE_SIZE)
  text = CLIPTextConfig(hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=TEXT_LENGTH)
  vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=4,
                            num_attention_heads=4, image_size=synthetic.IMAGE_SIZE, patch_size=8)
  return unet, vae, text, vision


# 'weak_embedding_reg' is a sensitivity point rather than an ablation: lambda_emb at a tenth.
ABLATIONS = ('no_offsets', 'no_embedding_reg', 'weak_embedding_reg')


def e4t_config(ablation: str = '', config: 'DemoTrainConfig | None' = None) -> model_lib.E4TConfig:
  """The demo's E4T settings (`config`'s e4t_* fields; default: the shipped recipe's); an ablation drops
  the weight offsets or the embedding regularizer (or weakens the regularizer tenfold)."""
  config_ = DemoTrainConfig() if config is None else config
  if ablation not in ('', *ABLATIONS):
    raise ConfigError(f'ablation {ablation!r} is not one of {ABLATIONS}.')
  # embedding_scale 1: the demo's text encoder is trained from scratch and its token embeddings have
  # norm ~0.16 (CLIP's init), so the reference's s = 0.1 (sized for SD's CLIP) leaves w* stuck at the
  # coarse word (a first run: |s f| ~ 0.001 after 700 steps).
  config = model_lib.E4TConfig(coarse_word=synthetic.COARSE_WORD, coarse_prompt='a {coarse}', tuning_prompt='a {}',
                               embedding_scale=1.0, lambda_embedding=config_.e4t_lambda_embedding,
                               min_snr_gamma=config_.e4t_min_snr_gamma, use_loss_mask=config_.e4t_loss_mask,
                               encoder=EncoderConfig(hidden_dim=128, clip_layers=(-1, -2)),
                               offsets=OffsetsConfig(rank=4, targets=() if ablation == 'no_offsets' else
                                                     OffsetsConfig().targets))
  if ablation == 'no_embedding_reg':
    config = dataclasses.replace(config, lambda_embedding=0.0)
  elif ablation == 'weak_embedding_reg':
    config = dataclasses.replace(config, lambda_embedding=config.lambda_embedding / 10)
  return config


def demo_tokenizer() -> CLIPTokenizer:
  return CLIPTokenizer.default().with_max_length(TEXT_LENGTH)


# ----------------------------------------------------------------------------- small helpers
def _log(message: str) -> None:
  print(f'[demo-train] {message}', file=sys.stderr, flush=True)


def _init(module: nn.Module, seed: int, *inputs) -> dict:
  shapes = jax.eval_shape(module.init, jax.random.key(seed), *inputs)['params']
  return nn.meta.unbox(host_init(shapes, seed=seed))


class DeadlineReached(E4TError):
  """A stage stopped at `run`'s time limit, its state checkpointed: running again resumes it."""


def _platform() -> str:
  device = jax.devices()[0]
  return f'{device.platform} ({device.device_kind})'


def _adamw(lr: float, steps: int, warmup: int = 100, weight_decay: float = 1e-4,
           schedule: str = 'cosine') -> optax.GradientTransformation:
  if schedule == 'constant':  # its warm-up does not depend on `steps` either: a run cut at k steps is the k-step run
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  else:
    warmup = min(warmup, max(steps // 10, 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, 2), end_value=lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def fit_step(loss_fn: Callable[[Any, dict, jax.Array], jax.Array], optimizer: optax.GradientTransformation,
             ema_decay: float = 0.0) -> Callable:
  """`fit`'s training step (not jitted): (params, ema, opt_state, batch, key, t) -> (params, ema,
  opt_state, loss). `e4t bench demo-train` times this very function."""

  def step(params, ema, opt_state, batch, key, t):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if ema_decay:
      decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    return params, ema, opt_state, loss

  return step


def fit(loss_fn: Callable[[Any, dict, jax.Array], jax.Array], params: Any, batches: Callable[[int], dict], *,
        steps: int, lr: float, seed: int, desc: str, ema_decay: float = 0.0, checkpoint: Path | None = None,
        checkpoint_every: int = 250, schedule: str = 'cosine', deadline: float | None = None,
        stop_at: float | None = None, step_offset: int = 0) -> tuple[Any, list[float]]:
  """Adam(W) with warm-up + cosine decay (or a constant rate) on `loss_fn(params, batch, key)`; one jitted step.

  ema_decay: keep an exponential moving average of the params, with the usual warm-up
    (decay min(ema_decay, (1 + t) / (10 + t)) at step t, so that the random init is forgotten early).
  checkpoint: a file where the whole state (params, EMA, optimizer, step, losses) is saved atomically
    every `checkpoint_every` steps; a run that finds it resumes from it, bit-equal to an uninterrupted
    run (batches and keys depend on the step only). The caller deletes it once the result is saved.
  schedule: 'cosine' (decays over `steps`) or 'constant' (the peak rate after warm-up).
  deadline: a `time.time()` after which the run checkpoints and raises `DeadlineReached` (at a step's end).
  stop_at: with schedule 'constant' only, a `time.time()` after which the run ends as finished, early: a
    constant schedule does not depend on `steps`, so this is the run of `steps` = the steps it ran.
  step_offset: step i of this run takes batch `batches(step_offset + i)` and EMA step `step_offset + i` (a
    continuation of a run of `step_offset` steps); its keys and learning rates are its own (fold_in(seed, i)).
  Returns (params, or their EMA when ema_decay > 0; the loss every 25 steps and at the last step, whose
  index + 1 is the number of steps run).
  """
  if stop_at is not None and schedule != 'constant':
    raise ConfigError(f"{desc}: a time-boxed run (stop_at) needs schedule='constant' (got {schedule!r}): "
                      'a decaying schedule depends on the step count.')
  optimizer = _adamw(lr, steps, schedule=schedule)
  step = jax.jit(fit_step(loss_fn, optimizer, ema_decay))
  state = (params, params if ema_decay else None, optimizer.init(params))
  start, losses = 0, []
  if checkpoint is not None and checkpoint.is_file():
    with np.load(checkpoint) as stored:
      leaves = [stored[f'leaf_{k}'] for k in range(int(stored['num_leaves']))]
      start, losses = int(stored['step']), [(int(i), float(v)) for i, v in stored['losses']]
    treedef = jax.tree.structure(state)
    if treedef.num_leaves != len(leaves):
      raise ConfigError(f'{checkpoint} holds another run\'s state ({len(leaves)} arrays, this run has '
                        f'{treedef.num_leaves}); delete it to start over.')
    state = jax.tree.unflatten(treedef, [jnp.asarray(leaf) for leaf in leaves])
    _log(f'{desc}: resuming at step {start} from {checkpoint}')
  params, ema, opt_state = state
  base_key = jax.random.key(seed)
  with progress_bar(steps, desc, initial=start) as progress:
    for i in range(start, steps):
      params, ema, opt_state, loss = step(params, ema, opt_state, batches(step_offset + i),
                                          jax.random.fold_in(base_key, i), jnp.float32(step_offset + i))
      now = time.time() if deadline is not None or stop_at is not None else 0.0
      last = i == steps - 1 or (stop_at is not None and now >= stop_at)
      if i % 25 == 0 or last:
        losses.append((i, float(loss)))
        progress.set_postfix(loss=f'{losses[-1][1]:.4f}')
      progress.update(1)
      if last:
        if i < steps - 1:
          _log(f'{desc}: the time limit ends the run at step {i + 1} of {steps} (constant schedule: finished)')
        break
      if checkpoint is not None and (i + 1) % checkpoint_every == 0:
        _save_fit_state(checkpoint, (params, ema, opt_state), i + 1, losses)
      if deadline is not None and now >= deadline:
        if checkpoint is not None:
          _save_fit_state(checkpoint, (params, ema, opt_state), i + 1, losses)
        raise DeadlineReached(f'{desc} stopped at the time limit at step {i + 1} of {steps}'
                              + (f' (checkpointed in {checkpoint})' if checkpoint is not None else ''))
  return (ema if ema_decay else params), losses


def _save_fit_state(path: Path, state: Any, step: int, losses: list) -> None:
  leaves = jax.device_get(jax.tree.leaves(state))
  tmp = path.with_name(path.name + '.tmp.npz')
  np.savez(tmp, num_leaves=len(leaves), step=step, losses=np.asarray(losses, np.float64).reshape(-1, 2),
           **{f'leaf_{k}': np.asarray(leaf) for k, leaf in enumerate(leaves)})
  os.replace(tmp, path)


class _Stages:
  """Finished stages on disk: `stages/<name>.safetensors` (flat params) + `<name>.json` (summary)."""

  def __init__(self, workdir: Path):
    self.dir = workdir / 'stages'
    self.dir.mkdir(parents=True, exist_ok=True)

  def done(self, name: str) -> bool:
    return (self.dir / f'{name}.json').is_file()

  def save(self, name: str, params: Any, summary: dict) -> None:
    write_params(self.dir / f'{name}.safetensors', params)
    atomic_write_bytes(self.dir / f'{name}.json', [json.dumps(summary, indent=2).encode()])

  def load_summary(self, name: str) -> dict:
    return json.loads((self.dir / f'{name}.json').read_text())

  def load(self, name: str) -> tuple[Any, dict]:
    return read_params(self.dir / f'{name}.safetensors'), self.load_summary(name)


# ----------------------------------------------------------------------------- stage 1: the data pool
def render_pool(size: int, seed: int, workers: int = 0) -> dict[str, np.ndarray]:
  return synthetic.SyntheticFaces(size, seed=seed).render_all(progress='render pool', workers=workers)


def _captions(context: np.ndarray, subject: str, identity: np.ndarray | None = None) -> list[str]:
  """Context captions; with `identity`, the subject is the identity in words (`Identity.words`)."""
  if identity is None:
    return [synthetic.Context.from_array(c).caption(subject) for c in context]
  return [synthetic.Context.from_array(c).caption(synthetic.Identity.from_array(i).words(subject))
          for c, i in zip(context, identity)]


def _to_unit(images: np.ndarray) -> np.ndarray:
  return images.astype(np.float32) / 127.5 - 1.0


def _batch_indices(pool_size: int, batch: int, seed: int, salt: int) -> Callable[[int], np.ndarray]:
  return lambda step: np.random.default_rng([seed, salt, step]).integers(0, pool_size, size=batch)


# ----------------------------------------------------------------------------- stage 2: VAE
def train_vae(config: DemoTrainConfig, vae_config: VAEConfig, pool: dict,
              checkpoint: Path | None = None, deadline: float | None = None) -> tuple[dict, dict]:
  vae = AutoencoderKL(vae_config)
  params = _init(vae, config.seed + 2, jnp.zeros((1, 4, 4, 3)))
  pick = _batch_indices(len(pool['images']), config.vae_batch, config.seed, 2)

  def loss_fn(params, batch, key):
    x = batch['images']
    posterior = vae.apply({'params': params}, x, method=AutoencoderKL.encode)
    reconstruction = vae.apply({'params': params}, posterior.sample(key), method=AutoencoderKL.decode)
    error = reconstruction - x
    return jnp.mean(error ** 2) + 0.1 * jnp.mean(jnp.abs(error)) + config.vae_kl_weight * jnp.mean(
        posterior.kl() / np.prod(posterior.mean.shape[1:]))

  # The VAE is convolutional (its mid-block attention takes any size): it trains on random
  # latent-aligned crops, 4x cheaper per image than whole 64x64 images, and is used on whole images.
  crop, factor = config.vae_crop, vae_config.downsample_factor

  def batches(i):
    rng = np.random.default_rng([config.seed, 22, i])
    top, left = factor * rng.integers(0, (synthetic.IMAGE_SIZE - crop) // factor + 1, size=2)
    return {'images': _to_unit(pool['images'][pick(i), top:top + crop, left:left + crop])}

  params, losses = fit(loss_fn, params, batches, steps=config.vae_steps, lr=config.vae_lr, seed=config.seed + 2,
                       desc='vae', checkpoint=checkpoint, checkpoint_every=config.checkpoint_every, deadline=deadline)
  # The latent scale: 1 / std of the posterior means over the pool (SD's scaling_factor is the same).
  encode = jax.jit(lambda p, x: vae.apply({'params': p}, x, method=AutoencoderKL.encode).mean)
  sample = np.concatenate([np.asarray(encode(params, _to_unit(pool['images'][i:i + 256])))
                           for i in range(0, min(2048, len(pool['images'])), 256)])
  scaling_factor = float(1.0 / max(sample.std(), 1e-6))
  return params, {'losses': losses, 'scaling_factor': scaling_factor}


def encode_pool(vae: AutoencoderKL, params: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Posterior (mean, std) of every pool image, unscaled."""
  encode = jax.jit(lambda p, x: vae.apply({'params': p}, x, method=AutoencoderKL.encode))
  means, stds = [], []
  for i in range(0, len(images), 256):
    posterior = encode(params, _to_unit(images[i:i + 256]))
    means.append(np.asarray(posterior.mean))
    stds.append(np.asarray(posterior.std))
  return np.concatenate(means), np.concatenate(stds)


# ----------------------------------------------------------------------------- stage 3: CLIP vision
class _AttributeHeads(nn.Module):
  """The vision tower with one linear classifier per generator attribute on its pooled output."""
  vision: CLIPVisionTransformer

  @nn.compact
  def __call__(self, pixels):
    pooled = self.vision(pixels).pooled_output
    names = list(synthetic.IDENTITY_ATTRIBUTES.items()) + list(synthetic.CONTEXT_ATTRIBUTES.items())
    return [nn.Dense(len(choices), name=f'head_{name}')(pooled) for name, choices in names]


def train_vision(config: DemoTrainConfig, vision_config: CLIPVisionConfig, pool: dict,
                 checkpoint: Path | None = None, deadline: float | None = None) -> tuple[dict, dict]:
  # Per-layer CLIP in the stages that draw their own init (`_init` draws by parameter name and order).
  model = _AttributeHeads(CLIPVisionTransformer(vision_config, with_projection=False, scan_layers=False))
  size = vision_config.image_size
  params = _init(model, config.seed + 3, jnp.zeros((1, size, size, 3)))
  labels = np.concatenate([pool['identity'], pool['context']], axis=1)
  pick = _batch_indices(len(labels), config.vision_batch, config.seed, 3)

  def loss_fn(params, batch, key):
    del key
    pixels = clip_preprocess((batch['images'] + 1.0) / 2.0, size)
    logits = model.apply({'params': params}, pixels)
    return sum(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(l, batch['labels'][:, k]))
               for k, l in enumerate(logits)) / len(logits)

  def batches(i):
    index = pick(i)
    return {'images': _to_unit(pool['images'][index]), 'labels': labels[index]}

  params, losses = fit(loss_fn, params, batches, steps=config.vision_steps, lr=config.vision_lr,
                       seed=config.seed + 3, desc='vision', checkpoint=checkpoint,
                       checkpoint_every=config.checkpoint_every, deadline=deadline)
  return params['vision'], {'losses': losses}


# ----------------------------------------------------------------------------- stage 4: text-to-image
def t2i_problem(config: DemoTrainConfig, unet_config: UNetConfig, text_config: CLIPTextConfig, latents: tuple,
                pool: dict, scaling_factor: float, dtype: Any = jnp.float32, attention: str | None = None
                ) -> tuple[Callable, dict, Callable[[int], dict]]:
  """The text-to-image stage as (loss_fn(params, batch, key), initial params, batches(step)).
  dtype, attention: the U-Net's compute dtype and attention implementation (the shipped model: float32,
  None; `e4t bench demo-train` tries others)."""
  unet = UNet(unet_config, dtype=dtype, attention_implementation=attention)
  text = CLIPTextTransformer(text_config, scan_layers=False)
  params = {'unet': _init(unet, config.seed + 4, *unet_lib.init_inputs(unet_config)),
            'text_encoder': _init(text, config.seed + 5, jnp.zeros((1, 1), jnp.int32))}
  tokenizer = demo_tokenizer()
  caption_ids = np.asarray(tokenizer(_captions(pool['context'], synthetic.COARSE_WORD)), np.int32)
  described_ids = np.asarray(tokenizer(_captions(pool['context'], synthetic.COARSE_WORD, pool['identity'])),
                             np.int32)
  empty_ids = np.asarray(tokenizer(['']), np.int32)[0]
  schedule = schedule_lib.NoiseSchedule.from_config(SD1_SCHEDULER_CONFIG)
  means, stds = latents
  pick = _batch_indices(len(means), config.t2i_batch, config.seed, 4)

  def loss_fn(params, batch, key):
    k_sample, k_noise, k_t = jax.random.split(key, 3)
    x0 = (batch['mean'] + batch['std'] * jax.random.normal(k_sample, batch['mean'].shape)) * scaling_factor
    noise = jax.random.normal(k_noise, x0.shape)
    t = schedule_lib.sample_timesteps(k_t, x0.shape[0], schedule)
    context = text.apply({'params': params['text_encoder']}, batch['input_ids']).last_hidden_state
    prediction = unet.apply({'params': params['unet']}, schedule_lib.add_noise(schedule, x0, noise, t), t, context)
    squared_error = (prediction - schedule_lib.training_target(schedule, x0, noise, t)) ** 2
    if not config.t2i_min_snr_gamma:
      return jnp.mean(squared_error)
    weight = schedule_lib.min_snr_weight(schedule, t, config.t2i_min_snr_gamma)  # [batch]
    return jnp.mean(weight * jnp.mean(squared_error, axis=(1, 2, 3)))

  def batches(i):
    index = pick(i)
    rng = np.random.default_rng([config.seed, 44, i])
    described = rng.random(len(index)) < config.identity_caption_rate
    ids = np.where(described[:, None], described_ids[index], caption_ids[index])
    ids[rng.random(len(index)) < config.caption_dropout] = empty_ids
    return {'mean': means[index], 'std': stds[index], 'input_ids': ids}

  return loss_fn, params, batches


def train_t2i(config: DemoTrainConfig, unet_config: UNetConfig, text_config: CLIPTextConfig, latents: tuple,
              pool: dict, scaling_factor: float, checkpoint: Path | None = None, deadline: float | None = None,
              stop_at: float | None = None) -> tuple[dict, dict]:
  """stop_at: with the 'constant' schedule, a time after which the stage ends early as finished."""
  loss_fn, params, batches = t2i_problem(config, unet_config, text_config, latents, pool, scaling_factor,
                                         dtype=jnp.dtype(config.t2i_dtype))
  params, losses = fit(loss_fn, params, batches, steps=config.t2i_steps, lr=config.t2i_lr, seed=config.seed + 4,
                       desc='text-to-image', ema_decay=config.ema_decay, checkpoint=checkpoint,
                       checkpoint_every=config.checkpoint_every, schedule=config.t2i_schedule, deadline=deadline,
                       stop_at=stop_at if config.t2i_schedule == 'constant' else None)
  return params, {'losses': losses, 'steps': losses[-1][0] + 1}


def as_shipped(params: Any) -> Any:
  """float32 params as the model folder stores them (float16) and loading reads them back (float32)."""
  return jax.tree.map(lambda x: np.asarray(np.asarray(x, np.float16), np.float32), jax.device_get(params))


def round_names(config: DemoTrainConfig) -> tuple[str, ...]:
  """The text-to-image stage and its continuation rounds, in order: ('t2i', 't2i-round1', ...)."""
  return ('t2i',) + tuple(f't2i-round{k}' for k in range(1, len(config.t2i_rounds) + 1))


def continue_t2i(config: DemoTrainConfig, index: int, unet_config: UNetConfig, text_config: CLIPTextConfig,
                 latents: tuple, pool: dict, scaling_factor: float, start: dict, checkpoint: Path | None = None,
                 deadline: float | None = None) -> tuple[dict, dict]:
  """Round `index` (1-based) of `config.t2i_rounds` from `start` (the previous stage's float32 params, which
  it rounds to float16 first). `latents`: the pool encoded by the float16 VAE. Returns (EMA params, summary)."""
  round_ = config.t2i_rounds[index - 1]
  offset = config.t2i_steps + sum(r.steps for r in config.t2i_rounds[:index - 1])
  round_config = dataclasses.replace(config, t2i_min_snr_gamma=round_.min_snr_gamma)
  with layers.auto_cpu_attention(round_.cpu_attention):
    loss_fn, init, batches = t2i_problem(round_config, unet_config, text_config, latents, pool, scaling_factor,
                                         dtype=jnp.dtype(config.t2i_dtype))
    start = as_shipped(start)
    if jax.tree.structure(start) != jax.tree.structure(init):
      raise ConfigError(f'text-to-image round {index}: the starting weights are not this architecture\'s.')
    params, losses = fit(loss_fn, start, batches, steps=round_.steps, lr=round_.lr,
                         seed=config.seed + 4 + 1000 * index, desc=f'text-to-image round {index}',
                         ema_decay=config.ema_decay, checkpoint=checkpoint, checkpoint_every=config.checkpoint_every,
                         deadline=deadline, step_offset=offset)
  return params, {'losses': losses, 'steps': round_.steps, 'offset': offset}


# ----------------------------------------------------------------------------- stage 5: E4T pretraining
def e4t_pretrain_config(config: DemoTrainConfig, ablation: str = ''):
  """The `e4t_jax/configs/base.py` run config of the E4T stage (synthetic faces with their captions)."""
  from e4t_jax.train.config import load_config  # pylint: disable=g-import-not-at-top
  run = load_config('base')
  run.model.base = run.model.image_encoder = 'demo-train'  # the model is passed in, not loaded
  run.e4t.coarse_word = synthetic.COARSE_WORD
  run.e4t.coarse_prompt = 'a {coarse}'
  run.encoder.hidden_dim = 128
  run.encoder.clip_layers = (-1, -2)
  method = e4t_config(ablation, config)
  run.e4t.lambda_embedding = method.lambda_embedding
  run.e4t.embedding_scale = method.embedding_scale
  run.e4t.min_snr_gamma = method.min_snr_gamma
  run.e4t.use_loss_mask = method.use_loss_mask
  run.offsets.targets = tuple(method.offsets.targets)
  run.optimizer.learning_rate = config.e4t_lr
  run.optimizer.warmup_steps = min(100, max(config.e4t_steps // 10, 1))
  run.optimizer.global_batch_size = config.e4t_batch
  run.data.source = 'synthetic_faces'
  run.data.synthetic_records = 100_000
  run.data.shuffle_seed = config.seed
  run.data.random_flip = True
  run.data.workers = config.e4t_data_workers
  run.train.num_steps = config.e4t_steps
  run.train.log_every = 25
  run.train.checkpoint_every = 200
  run.train.keep_checkpoints = 1
  run.train.async_checkpoints = False
  run.train.seed = config.seed
  run.mesh.num_devices = 1
  return run


# ----------------------------------------------------------------------------- driver
# Fields that do not change the stages a model folder holds (VAE, vision tower, text-to-image): a model may be
# continued under other values of these.
# The CLIP vision stage's fields: it feeds only the E4T stage, so a model may be continued under other values of
# these; its vision stage is then trained again instead of seeded.
_VISION_FIELDS = ('vision_steps', 'vision_batch', 'vision_lr')
_NOT_BASE_FIELDS = _VISION_FIELDS + ('t2i_rounds', 'e4t_steps', 'e4t_batch', 'e4t_lr', 'e4t_data_workers',
                                     'e4t_lambda_embedding', 'e4t_min_snr_gamma', 'e4t_loss_mask', 'readout_steps',
                                     'readout_pool', 'checkpoint_every')


def seed_stages(workdir: str | os.PathLike, model_dir: str | os.PathLike, config: DemoTrainConfig) -> list[str]:
  """Writes the stages that a model folder trained by `e4t demo-train` holds into `workdir/stages/` (its VAE,
  vision tower and last text-to-image weights, float16 as shipped; `run` reuses its judge), so that `run` trains only
  the text-to-image rounds `config` adds and the E4T stage. The model must have been trained under `config`
  (every recorded base field equal) with a proper prefix of its rounds; where its vision stage's settings differ,
  that stage is not seeded (`run` trains it). Returns the stage names written."""
  from e4t_jax.e4t import io as io_lib  # pylint: disable=g-import-not-at-top
  from e4t_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  model_dir = Path(model_dir)
  training_path = model_dir / 'training.json'
  if not training_path.is_file():
    raise InputError(f'--base-from {model_dir}: no training.json; pass a model folder written by e4t demo-train.')
  training = json.loads(training_path.read_text())
  recorded = training['config']
  mine = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as training.json has them
  for key, value in recorded.items():
    if key not in _NOT_BASE_FIELDS and key in mine and mine[key] != value:
      raise ConfigError(f'--base-from {model_dir}: it was trained with {key}={value}, this run has {mine[key]}; '
                        'the same settings are needed to continue it.')
  base_rounds = tuple(T2IRound(**r) for r in recorded.get('t2i_rounds', ()))
  if config.t2i_rounds[:len(base_rounds)] != base_rounds or len(config.t2i_rounds) <= len(base_rounds):
    raise ConfigError(f'--base-from {model_dir}: its text-to-image rounds {list(base_rounds)} must be the first of '
                      f'this run\'s {list(config.t2i_rounds)}, which adds at least one (--t2i-round STEPS:LR[:GAMMA]).')
  model = io_lib.load_model(model_dir)
  float32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(tree))
  stages = _Stages(Path(workdir))
  # Where each stage ran, carried over from the model's record (so that a model continued over sessions keeps it).
  platforms = training.get('stage_platform', {})
  origin = lambda name: f'{platforms[name]}; seeded from {model_dir}' if platforms.get(name) else f'from {model_dir}'
  seconds = training.get('stage_seconds', {})
  stages.save('vae', float32(model.params['vae']), {'scaling_factor': model.modules.vae.config.scaling_factor,
                                                    'seconds': seconds.get('vae'), 'platform': origin('vae')})
  same_vision = all(recorded.get(key, mine[key]) == mine[key] for key in _VISION_FIELDS)
  if same_vision:
    stages.save('vision', clip_lib.unstack_layers(float32(model.params['image_encoder'])),
                {'seconds': seconds.get('vision'), 'platform': origin('vision')})
  names = round_names(config)[:len(base_rounds) + 1]
  for name in names[:-1]:  # finished, their weights not kept: only the last is read
    atomic_write_bytes(stages.dir / f'{name}.json', [json.dumps(
        {'seconds': seconds.get(name), 'platform': origin(name), 'weights': 'not kept'}).encode()])
  stages.save(names[-1], {'unet': float32(model.params['unet']),
                          'text_encoder': clip_lib.unstack_layers(float32(model.params['text_encoder']))},
              {'steps': recorded.get('t2i_steps', config.t2i_steps) if len(names) == 1 else base_rounds[-1].steps,
               'seconds': seconds.get(names[-1]), 'platform': origin(names[-1])})
  return ['vae', *(['vision'] if same_vision else []), *names]


def build_model(config: DemoTrainConfig, vae_params: dict, vae_summary: dict, vision_params: dict,
                t2i_params: dict, ablation: str = '') -> model_lib.E4TModel:
  unet_config, vae_config, text_config, vision_config = architecture(config)
  vae_config = dataclasses.replace(vae_config, scaling_factor=vae_summary['scaling_factor'])
  # The E4T stage runs the CLIP towers as every loaded model does: layers scanned, params stacked.
  sd = StableDiffusion(UNet(unet_config), AutoencoderKL(vae_config), CLIPTextTransformer(text_config),
                       demo_tokenizer(), dict(SD1_SCHEDULER_CONFIG),
                       {'unet': t2i_params['unet'], 'vae': vae_params,
                        'text_encoder': clip_lib.stack_layers(t2i_params['text_encoder'])})
  vision = CLIPVisionTransformer(vision_config, with_projection=False, scan_layers=False)  # init_e4t stacks it
  return model_lib.init_e4t(jax.random.key(config.seed + 6), e4t_config(ablation, config), sd, vision, vision_params)


def run(workdir: str | os.PathLike, config: DemoTrainConfig = DemoTrainConfig(), *,
        install_to: str | os.PathLike | None = None, ablation: str = '', render_workers: int = 0,
        time_limit_s: float | None = None, reserve_s: float = 0.0, readout_from: str | os.PathLike | None = None,
        base_from: str | os.PathLike | None = None, variant: str = '') -> dict:
  """Runs (or resumes) every stage; returns the summary also written to `workdir/model/training.json`.

  ablation: '' or one of `ABLATIONS`: the E4T stage is trained without weight offsets or without the
    embedding regularizer (into `workdir/e4t-<ablation>/`, model folder `workdir/model-<ablation>/`),
    on the same base stages.
  variant: a name for an E4T stage trained with other e4t_* settings of `config` on the same base stages
    (`workdir/e4t-<variant>/`, `workdir/model-<variant>/`; with an ablation: `-<ablation>-<variant>`).
  render_workers: processes that render the data pool (the pool is the same for any number).
  time_limit_s: seconds from now. The VAE, vision and text-to-image stages stop at a step's end once it
    has passed, checkpointed, raising `DeadlineReached` (running again resumes). With the 'constant'
    text-to-image schedule, that stage also ends early, as finished, `reserve_s` before the limit
    (the time the E4T stage and the model folder need), and its step count is recorded in
    training.json's config.
  readout_from: a trained judge (`readout.safetensors`, e.g. the shipped model's) to use instead of
    training one: the judge does not depend on the other stages, and reusing it keeps the scores of
    two models comparable.
  base_from: a model folder trained by this command under `config` less its last text-to-image rounds
    (e.g. the shipped model): its stages are seeded into the work folder (`seed_stages`), its judge is
    the `readout_from` unless one is given, and only the added rounds and the E4T stage train.
  """
  e4t_config(ablation, config)  # validates
  config.validate()
  if variant and not re.fullmatch(r'[A-Za-z0-9_.=+]+', variant):
    raise ConfigError(f'variant {variant!r}: use letters, digits and _ . = + (it names folders).')
  workdir = Path(workdir).absolute()  # orbax (the E4T stage's checkpoints) refuses relative paths
  if base_from is not None and readout_from is None:
    readout_from = Path(base_from) / 'readout.safetensors'
  if readout_from is not None:
    from e4t_jax.lab import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.ReadoutModel.load(readout_from)  # a readable judge, or a one-line error, before any work
  if time_limit_s is not None and not time_limit_s > 0:
    raise ConfigError(f'the time limit must be positive, got {time_limit_s} s.')
  limits = None if time_limit_s is None else (time.time() + time_limit_s, time.time() + time_limit_s - reserve_s)
  if base_from is not None and not (workdir / 'stages' / 'vae.json').is_file():
    _log(f'seeded {", ".join(seed_stages(workdir, base_from, config))} from {base_from}')
  with layers.auto_cpu_attention(config.cpu_attention):
    return _run(workdir, config, install_to=install_to, ablation=ablation, render_workers=render_workers,
                limits=limits, readout_from=readout_from, variant=variant)


def _run(workdir: Path, config: DemoTrainConfig, *, install_to: str | os.PathLike | None, ablation: str,
         render_workers: int = 0, limits: tuple[float, float] | None = None,
         readout_from: str | os.PathLike | None = None, variant: str = '') -> dict:
  from e4t_jax.e4t import io as io_lib  # pylint: disable=g-import-not-at-top
  from e4t_jax.train import loop  # pylint: disable=g-import-not-at-top
  stages = _Stages(workdir)
  unet_config, vae_config, text_config, vision_config = architecture(config)
  timings: dict[str, float] = {}

  def timed(name: str, fn):
    start = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    _log(f'{name}: {timings[name]:.0f}s')
    return out

  deadline, stop_at = limits if limits is not None else (None, None)
  pool_path = stages.dir / 'pool.npz'
  loaded: dict[str, dict] = {}

  def pool() -> dict[str, np.ndarray]:
    """The data pool, rendered on first use (a finished run's later invocations need none)."""
    if 'pool' in loaded:
      return loaded['pool']
    if pool_path.is_file():
      loaded['pool'] = load_pool(pool_path)
      return loaded['pool']
    loaded['pool'] = timed('pool', lambda: render_pool(config.pool_size, config.seed, render_workers))
    tmp = pool_path.with_suffix('.tmp.npz')
    np.savez(tmp, **loaded['pool'])
    os.replace(tmp, pool_path)
    atomic_write_bytes(stages.dir / 'pool.json',
                       [json.dumps({'seconds': timings['pool'], 'platform': 'host (numpy)',
                                    'workers': render_workers}).encode()])
    return loaded['pool']

  state = lambda name: stages.dir / f'{name}.state.npz'  # mid-stage checkpoints, deleted once a stage is saved

  def stage(name: str, fn):
    if stages.done(name):
      _log(f'{name}: done before, loading')
      return stages.load(name)
    params, summary = timed(name, fn)
    summary['seconds'] = timings[name]
    summary['platform'] = _platform()
    stages.save(name, params, summary)
    state(name).unlink(missing_ok=True)  # the stage's result is on disk: its mid-stage checkpoint goes
    return params, summary

  suffix = ''.join(f'-{name}' for name in (ablation, variant) if name)
  e4t_dir = workdir / f'e4t{suffix}'
  if not (e4t_dir / 'model' / 'e4t.json').is_file():
    # (Once the E4T stage's model is saved, the earlier stages' params are in it: none is loaded.)
    vae_params, vae_summary = stage('vae', lambda: train_vae(config, vae_config, pool(), state('vae'), deadline))
    vision_params, _ = stage('vision', lambda: train_vision(config, vision_config, pool(), state('vision'),
                                                            deadline))

    def t2i():
      vae = AutoencoderKL(vae_config)
      latents = encode_pool(vae, vae_params, pool()['images'])
      return train_t2i(config, unet_config, text_config, latents, pool(), vae_summary['scaling_factor'],
                       state('t2i'), deadline, stop_at)

    # The stage and its rounds in order; only the last finished one's weights are read (a model folder
    # seeded by `seed_stages` holds only its last).
    names = round_names(config)
    done = [k for k, name in enumerate(names) if stages.done(name)]
    t2i_params, _ = stage(names[done[-1]] if done else 't2i', t2i)  # trains 't2i' or loads the last done
    if len(names) > 1:  # with rounds, what follows the base stages reads them as shipped (float16), so that a
      # run seeded from a model folder (`seed_stages`) and one from scratch train the same bits
      vae_params, vision_params = as_shipped(vae_params), as_shipped(vision_params)
    shipped_latents = None
    for index in range(done[-1] + 1 if done else 1, len(names)):
      if shipped_latents is None:  # the rounds read the pool through the VAE as it ships (float16)
        shipped_latents = encode_pool(AutoencoderKL(vae_config), vae_params, pool()['images'])
      t2i_params, _ = stage(names[index], functools.partial(
          continue_t2i, config, index, unet_config, text_config, shipped_latents, pool(),
          vae_summary['scaling_factor'], t2i_params, state(names[index]), deadline))
    model = build_model(config, vae_params, vae_summary, vision_params, t2i_params, ablation)
    run_config = e4t_pretrain_config(config, ablation)
    e4t_summary = timed('e4t', lambda: loop.train_and_evaluate(run_config, e4t_dir, model=model))
    e4t_summary = {k: v for k, v in e4t_summary.items() if isinstance(v, (int, float, bool))}
    atomic_write_bytes(stages.dir / f'e4t{suffix}.json',
                       [json.dumps(dict(e4t_summary, seconds=timings['e4t'], platform=_platform()), indent=2).encode()])
  trained_steps = stages.load_summary('t2i').get('steps', config.t2i_steps)
  if trained_steps != config.t2i_steps:  # a time-boxed constant-schedule stage
    config = dataclasses.replace(config, t2i_steps=trained_steps)  # what was trained, for training.json

  from e4t_jax.lab import evaluate  # pylint: disable=g-import-not-at-top
  readout_path = stages.dir / 'readout.safetensors'
  if not readout_path.is_file() and readout_from is not None:
    shutil.copyfile(readout_from, readout_path.with_name('readout.tmp.safetensors'))
    os.replace(readout_path.with_name('readout.tmp.safetensors'), readout_path)
    # A model folder's judge keeps its record (training.json beside it); any other file is recorded as a copy.
    record = Path(readout_from).with_name('training.json')
    record = json.loads(record.read_text()) if record.is_file() else {}
    trained = record.get('stage_platform', {}).get('readout')
    atomic_write_bytes(stages.dir / 'readout.json', [json.dumps(
        {'seconds': record.get('stage_seconds', {}).get('readout', 0.0) if trained else 0.0,
         'platform': f'{trained}; copied from {readout_from}' if trained else f'copied from {readout_from}'}).encode()])
  if not readout_path.is_file():
    readout = timed('readout', lambda: evaluate.train_readout(
        num_steps=config.readout_steps, num_records=config.readout_pool, seed=config.seed))
    readout.save(readout_path)
    atomic_write_bytes(stages.dir / 'readout.json',
                       [json.dumps({'seconds': timings['readout'], 'platform': _platform()}).encode()])

  model = io_lib.load_model(e4t_dir / 'model')
  demo_config = dataclasses.replace(model.config, tuning_prompt=e4t_config(ablation, config).tuning_prompt)
  model = model_lib.E4TModel(dataclasses.replace(model.modules, config=demo_config), model.params)
  # The frozen networks ship in float16 (as Stable Diffusion's fp16 variant does): half the bytes;
  # loading casts them back to float32. The trained encoder and offsets stay float32.
  params = dict(model.params)
  for name in model_lib.FROZEN:
    params[name] = jax.tree.map(lambda x: np.asarray(x, np.float16), jax.device_get(params[name]))
  out = workdir / f'model{suffix}'
  io_lib.save_model(model_lib.E4TModel(model.modules, params), out)
  shutil.copyfile(readout_path, out / 'readout.safetensors')
  previous, platforms = {}, {}  # seconds and machines of the stages (earlier invocations' too)
  for name in STAGES[:3] + round_names(config) + STAGES[4:]:
    if stages.done(name):
      previous[name] = stages.load_summary(name).get('seconds')
      platforms[name] = stages.load_summary(name).get('platform')
  summary = {'config': dataclasses.asdict(config), 'stage_seconds': {**previous, **timings},
             'stage_platform': platforms,
             'bytes': sum(p.stat().st_size for p in out.rglob('*') if p.is_file())}
  atomic_write_bytes(out / 'training.json', [json.dumps(summary, indent=2).encode()])
  _log(f'model folder {out} ({summary["bytes"] / 1e6:.1f} MB)')
  if install_to is not None:
    install_to = Path(install_to)
    tmp = install_to.with_name(install_to.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out, tmp)
    shutil.rmtree(install_to, ignore_errors=True)
    os.replace(tmp, install_to)
    _log(f'installed into {install_to}')
  return summary

