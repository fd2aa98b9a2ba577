"""E4T domain pretraining: config -> mesh -> model -> data -> compile -> loop.

    e4t pretrain --config configs/tiny.py --workdir /tmp/e4t_tiny [--config.train.num_steps=50]

Read `train_and_evaluate` top to bottom: it builds the model from the config, places the trainable
and frozen weights on a (data, fsdp, tensor) device mesh, opens a resumable grain loader, compiles
the train step once (ahead of time, with its FLOP count), then runs the loop with logging,
periodic asynchronous checkpoints, preemption handling (SIGTERM/SIGINT -> save -> exit) and
automatic resumption. At the end the trained E4T model folder is written to `workdir/model/`.

Outputs in `workdir`:
    checkpoints/<step>/   orbax checkpoints (train state + data position + config)
    metrics.jsonl         one JSON object per logged step (process 0)
    tensorboard/          event files, when tensorboardX (or TensorFlow) is installed
    model/                the E4T model folder (`e4t_jax.e4t.io.load_model` reads it)
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from e4t_jax import fileio, runtime
from e4t_jax.data import loader as loader_lib
from e4t_jax.data import sources
from e4t_jax.e4t import model as model_lib
from e4t_jax.errors import ConfigError, E4TError, printable
from e4t_jax.models import clip as clip_lib
from e4t_jax.models import unet as unet_lib
from e4t_jax.models import vae as vae_lib
from e4t_jax.parallel import mesh as mesh_lib
from e4t_jax.train import checkpoint as checkpoint_lib
from e4t_jax.train import config as config_lib
from e4t_jax.train import step as step_lib

StepHook = Callable[[int, dict, dict], None]  # (step, this process's host batch, device metrics)


# ----------------------------------------------------------------------------- model
def _with_dtype(modules: model_lib.E4TModules, dtype: Any, remat_policy: str = '') -> model_lib.E4TModules:
  """The same modules computing in `dtype` (params stay float32), the U-Net rematerialized per block."""
  if remat_policy:
    modules = dataclasses.replace(modules, unet=modules.unet.clone(remat_policy=remat_policy))
  if dtype == jnp.float32:
    return modules
  return dataclasses.replace(
      modules, unet=modules.unet.clone(dtype=dtype), vae=modules.vae.clone(dtype=dtype),
      text_encoder=modules.text_encoder.clone(dtype=dtype), image_encoder=modules.image_encoder.clone(dtype=dtype),
      encoder=modules.encoder.clone(dtype=dtype))


def build_model(run: config_lib.RunConfig) -> model_lib.E4TModel:
  """The tiny random model, or Stable Diffusion + a CLIP image encoder from local folders."""
  key = jax.random.key(run.train.seed)
  source = run.model
  if source.base == 'tiny':
    model = model_lib.init_tiny(key, run.e4t)
  else:
    from e4t_jax.convert.clip import load_image_encoder  # pylint: disable=g-import-not-at-top
    from e4t_jax.convert.pipeline import load_stable_diffusion  # pylint: disable=g-import-not-at-top
    sd = load_stable_diffusion(source.base)
    image_encoder, image_encoder_params = load_image_encoder(source.image_encoder, with_projection=False)
    model = model_lib.init_e4t(key, run.e4t, sd, image_encoder, image_encoder_params)
  return model_lib.E4TModel(_with_dtype(model.modules, jnp.dtype(source.dtype), source.remat_policy), model.params)


def model_param_shardings(model: model_lib.E4TModel, mesh, rules) -> dict:
  """A NamedSharding for every parameter of the model, from its modules' logical axis names.

  The weight offsets carry no logical axes: `down` [in, rank] is split like a kernel's input side
  (fsdp), `up` [rank, out] like its output side (tensor), each replicated where a size does not divide.
  """
  m = model.modules
  unet_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.params['unet'])
  boxed_encoder = jax.eval_shape(lambda k: model_lib.init_trainable(k, m, unet_shapes, boxed=True),
                                 jax.random.key(0))['encoder']
  shardings = {
      'unet': mesh_lib.param_shardings(unet_lib.abstract_params(m.unet), mesh, rules),
      'vae': mesh_lib.param_shardings(vae_lib.abstract_params(m.vae), mesh, rules),
      'text_encoder': mesh_lib.param_shardings(clip_lib.abstract_params(m.text_encoder), mesh, rules),
      'image_encoder': mesh_lib.param_shardings(clip_lib.abstract_params(m.image_encoder), mesh, rules),
      'encoder': mesh_lib.param_shardings(boxed_encoder, mesh, rules),
  }
  offset_specs = {'down': P('fsdp', None), 'up': P(None, 'tensor')}
  shardings['weight_offsets'] = {
      path: {name: NamedSharding(mesh, mesh_lib.fit_spec_to_shape(offset_specs[name], value.shape, mesh))
             for name, value in pair.items()}
      for path, pair in model.params['weight_offsets'].items()}
  return shardings


def state_and_frozen_shardings(model: model_lib.E4TModel, mesh, rules, frozen_sharding: str) -> tuple[dict, dict]:
  """(trainable shardings, frozen shardings): frozen ones replicated or by the rules ('fsdp')."""
  patterns = model.config.trainable_patterns
  by_rules = model_param_shardings(model, mesh, rules)
  frozen_rules = mesh_lib.REPLICATED_RULES if frozen_sharding == 'replicated' else rules
  for_frozen = by_rules if frozen_rules is rules else model_param_shardings(model, mesh, frozen_rules)
  trainable, _ = model_lib.split_params(by_rules, patterns)
  _, frozen = model_lib.split_params(for_frozen, patterns)
  return trainable, frozen


def place(tree: Any, shardings: Any, *, copy: bool = False) -> Any:
  """Puts a tree (identical on every process) onto its shardings.

  copy: through host memory, so the result never shares buffers with `tree` (the train step donates
  the trainable weights; the caller's model must stay usable).
  """
  if copy or jax.process_count() > 1:
    tree = jax.tree.map(np.asarray, jax.device_get(tree))
  return jax.device_put(tree, shardings)


# ----------------------------------------------------------------------------- data
def make_source(data: config_lib.DataConfig, image_size: int, with_mask: bool):
  """The record source `data` names, at `data.resolution` (0: the model's `image_size`)."""
  size = data.resolution or image_size
  if data.source == 'synthetic':
    return sources.SyntheticSource(data.synthetic_records, size, seed=data.shuffle_seed, with_mask=with_mask)
  if data.source == 'synthetic_faces':
    from e4t_jax.data.synthetic import SyntheticFaces  # pylint: disable=g-import-not-at-top
    return SyntheticFaces(data.synthetic_records, size, seed=data.shuffle_seed, with_mask=with_mask)
  if data.source == 'folder':
    return sources.ImageFolderSource(data.path, size, mask_folder=data.mask_path or None)
  if data.source == 'array_record':
    return sources.ArrayRecordSource(data.path, size)
  return sources.TFDSSource(data.path, data.tfds_split, data.tfds_data_dir or None, size,
                            mask_key=data.tfds_mask_key or None)  # 'tfds' (DataConfig checks the name)


def prompts_for_step(templates: Sequence[str], placeholder: str, batch_size: int, *, seed: int, step: int,
                     process_index: int) -> list[str]:
  """One random template per example; depends only on (seed, step, process), so resuming repeats it."""
  rng = np.random.default_rng([seed, step, process_index])
  return [templates[i].format(placeholder) for i in rng.integers(0, len(templates), size=batch_size)]


# ----------------------------------------------------------------------------- logging
class MetricWriter:
  """Console + JSONL + (optional) TensorBoard, on process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    log_dir = os.path.join(workdir, 'tensorboard')
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(log_dir)
    except ImportError:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        self._tensorboard = _TFSummaryWriter(tf, log_dir)
      except ImportError:
        print('[e4t] TensorBoard logging off: neither tensorboardX nor tensorflow is installed '
              f'(metrics go to {os.path.join(workdir, "metrics.jsonl")}).', flush=True)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    if self._tensorboard is not None:
      for name, value in metrics.items():
        self._tensorboard.add_scalar(name, value, step)

  def print(self, text: str) -> None:
    if self.enabled:
      print(f'[e4t] {text}', flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


class _TFSummaryWriter:
  def __init__(self, tf, log_dir):
    self._tf, self._writer = tf, tf.summary.create_file_writer(log_dir)

  def add_scalar(self, name, value, step):
    with self._writer.as_default():
      self._tf.summary.scalar(name, value, step=step)

  def close(self):
    self._writer.close()


# ----------------------------------------------------------------------------- preemption
class PreemptionWatcher:
  """Turns SIGTERM / SIGINT into a "save and stop" request the loop checks after every step.

  With several processes every host must stop at the same step, so the decision comes from JAX's
  preemption sync point (the coordination service sees SIGTERM on any host); the local handlers
  are installed only for a single process.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self._requested.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self._requested.set()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # pylint: disable=broad-except  (no preemption service)
        return False
    return self._requested.is_set()


# ----------------------------------------------------------------------------- the run
def check_model_matches_run(model: model_lib.E4TModel, run: config_lib.RunConfig) -> None:
  """A prebuilt model's E4T settings must be the run's: the loss reads the model's (`model.modules.config`)
  while the data (masks, placeholder prompts) follows the run's. Only the tuning stage's prompt may differ."""
  ours, theirs = model.modules.config, run.e4t
  differing = [f.name for f in dataclasses.fields(ours)
               if f.name != 'tuning_prompt' and getattr(ours, f.name) != getattr(theirs, f.name)]
  if differing:
    raise ConfigError(f'train_and_evaluate(model=...): the model\'s E4T config differs from the run\'s e4t config in '
                      f'{", ".join(differing)} (the loss would follow one, the data the other); build the model '
                      'from this run config, or set these fields in the run config as the model has them.')


def train_and_evaluate(config: config_lib.RunConfig | ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       step_hooks: Sequence[StepHook] = (), model: model_lib.E4TModel | None = None
                       ) -> dict[str, Any]:
  """Pretrains an E4T domain encoder + weight offsets; resumes from `workdir` if it holds checkpoints.

  Args:
    config: the run (`config.load_run_config`), or a ConfigDict (`config.load_config`) that is typed and
      checked here, once (see e4t_jax/configs/base.py for every field).
    workdir: where checkpoints, metrics and the final model folder go (local path or gs://).
    step_hooks: called after every step as hook(step, host_batch, metrics) (tests, custom logging).
    model: an already built model to start from (tests, notebooks); None: `build_model(config)`.
  Returns:
    The last step's metrics (floats), plus 'step', 'preempted', 'steps_per_s', 'images_per_s',
    'compile_s', 'step_flops' and, when known, 'tflops_per_s' and 'mfu'.
  """
  workdir = os.fspath(workdir)
  run = config if isinstance(config, config_lib.RunConfig) else config_lib.run_config(config)
  del config
  if model is not None:
    check_model_matches_run(model, run)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  rules = run.mesh.logical_axis_rules
  global_batch = run.global_batch_size
  num_steps = run.train.num_steps

  # 1. The device mesh.
  mesh = run.mesh.make_mesh()
  batch_axes = ('data', 'fsdp')
  if global_batch % (mesh.shape['data'] * mesh.shape['fsdp']):
    raise ConfigError(f'optimizer.global_batch_size={global_batch} must be divisible by mesh data x fsdp = '
                      f'{mesh.shape["data"] * mesh.shape["fsdp"]}.')
  writer.print(f'mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)')

  # 2. The model, split into trainable and frozen weights, placed on the mesh.
  model = build_model(run) if model is None else model
  modules = model.modules
  trainable_shardings, frozen_shardings = state_and_frozen_shardings(model, mesh, rules, run.mesh.frozen_sharding)
  trainable, frozen = model_lib.split_params(model.params, modules.config.trainable_patterns)
  trainable, frozen = place(trainable, trainable_shardings, copy=True), place(frozen, frozen_shardings)
  del model
  writer.print(f'trainable params {model_lib.count_params(trainable):,}, frozen {model_lib.count_params(frozen):,}')

  optimizer = step_lib.make_optimizer(run.optimizer)
  learning_rate = step_lib.learning_rate_schedule(run.optimizer)
  replicated = NamedSharding(mesh, P())
  # Optimizer moments are sharded like their params; counters are replicated.
  opt_state_shardings = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, trainable), trainable_shardings,
      transform_non_params=lambda _: replicated)
  state = step_lib.TrainState(
      step=jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=replicated)(), trainable=trainable,
      opt_state=jax.jit(optimizer.init, out_shardings=opt_state_shardings)(trainable))
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  # 3. The data: this process's share of every global batch.
  loader = loader_lib.make_loader(
      make_source(run.data, modules.image_size, run.e4t.use_loss_mask), global_batch_size=global_batch,
      seed=run.data.shuffle_seed, worker_count=run.data.workers, random_flip=run.data.random_flip)
  data_iterator = iter(loader)

  # 4. Resume from the latest checkpoint, if any.
  checkpointer = checkpoint_lib.TrainCheckpointer(
      os.path.join(workdir, 'checkpoints'), keep=run.train.keep_checkpoints,
      save_every=run.train.checkpoint_every, async_save=run.train.async_checkpoints)
  fingerprint = checkpoint_lib.frozen_fingerprint(frozen)
  if checkpointer.latest_step() is not None:
    restored = checkpointer.restore(state, fingerprint=fingerprint)
    state = restored.state
    loader_lib.iterator_state_from_bytes(data_iterator, restored.data_iterator)
    writer.print(f'resumed from step {restored.step} ({checkpointer.directory})')
  start_step = int(jax.device_get(state.step))

  # 5. Compile the step once, ahead of time.
  image_size = run.data.resolution or modules.image_size
  prompt_length = modules.tokenize(['']).shape[1]
  batch_shardings = {'images': NamedSharding(mesh, P(batch_axes)), 'input_ids': NamedSharding(mesh, P(batch_axes))}
  abstract_batch = {'images': jax.ShapeDtypeStruct((global_batch, image_size, image_size, 3), jnp.float32),
                    'input_ids': jax.ShapeDtypeStruct((global_batch, prompt_length), jnp.int32)}
  if run.e4t.use_loss_mask:
    batch_shardings['mask'] = NamedSharding(mesh, P(batch_axes))
    abstract_batch['mask'] = jax.ShapeDtypeStruct((global_batch, image_size, image_size), jnp.float32)
  base_rng = jax.jit(lambda: jax.random.key(run.train.seed + 1), out_shardings=replicated)()
  train_step = step_lib.make_train_step(modules, optimizer)

  def step_with_rng(state, frozen, batch, base_rng):
    return train_step(state, frozen, batch, jax.random.fold_in(base_rng, state.step))

  jitted = jax.jit(step_with_rng, in_shardings=(state_shardings, frozen_shardings, batch_shardings, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
  compile_start = time.perf_counter()
  with mesh_lib.activation_sharding(mesh, rules):
    lowered = jitted.lower(state, frozen, abstract_batch, base_rng)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - compile_start
  step_flops = runtime.cost_stats(lowered)['flops'] or 0.0  # the global step, all devices together
  peak = run.train.peak_tflops_per_device or runtime.peak_tflops() or 0.0
  writer.print(f'compiled the train step in {compile_s:.1f}s; {step_flops / 1e12:.3f} TFLOP per step')

  # 6. The loop.
  process_batch = global_batch // jax.process_count()
  config_json = json.loads(run.as_json)
  summary: dict[str, Any] = {'step': start_step, 'preempted': False, 'compile_s': compile_s,
                             'step_flops': step_flops}
  progress = _progress_bar(run.train.progress_bar, start_step, num_steps)
  last_time, last_step, saved_step = time.perf_counter(), start_step, start_step
  with PreemptionWatcher() as preemption:
    for step in range(start_step + 1, num_steps + 1):
      host_batch = dict(next(data_iterator))
      if not run.e4t.use_loss_mask:
        host_batch.pop('mask', None)
      captions = host_batch.pop('caption', None)
      if captions is not None:  # the data's own captions, with the placeholder for the subject
        prompts = [bytes(c).decode().format(run.e4t.placeholder) for c in captions]
      else:
        prompts = prompts_for_step(run.templates, run.e4t.placeholder, process_batch,
                                   seed=run.data.shuffle_seed, step=step, process_index=jax.process_index())
      host_batch['input_ids'] = modules.tokenize(prompts)
      batch = {k: jax.make_array_from_process_local_data(batch_shardings[k], v) for k, v in host_batch.items()}
      state, metrics = compiled(state, frozen, batch, base_rng)
      for hook in step_hooks:
        hook(step, host_batch, metrics)
      progress.update(1)

      if step % run.train.log_every == 0 or step == num_steps:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        steps_per_s = (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        values.update(learning_rate=float(learning_rate(step - 1)), steps_per_s=steps_per_s,
                      images_per_s=steps_per_s * global_batch)
        if step_flops:
          values['tflops_per_s'] = step_flops * steps_per_s / 1e12
          if peak:
            values['mfu'] = values['tflops_per_s'] / (peak * mesh.size)
        writer.write(step, values)
        if not progress.disable:  # the bar shows the loss; without one, a log line does
          progress.set_postfix(loss=f'{values["loss"]:.4f}', img_s=f'{values["images_per_s"]:.1f}')
        elif writer.enabled:
          writer.print(f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in values.items()))
        summary.update(values)

      stop = preemption.should_stop(step)
      if checkpointer.should_save(step) or step == num_steps or stop:
        checkpointer.save(step, state, loader_lib.iterator_state_to_bytes(data_iterator), config_json, fingerprint)
        saved_step = step
      summary['step'] = step
      if stop:
        summary['preempted'] = True
        writer.print(f'preempted: saved step {step}, exiting; run again with the same workdir to resume')
        break
  progress.close()
  if summary['step'] != saved_step:
    checkpointer.save(summary['step'], state, loader_lib.iterator_state_to_bytes(data_iterator), config_json,
                      fingerprint)
  checkpointer.close()

  # 7. The E4T model folder.
  if run.train.save_model and not summary['preempted'] and summary['step'] >= num_steps:
    _save_model_folder(modules, state.trainable, frozen, os.path.join(workdir, 'model'), writer)
  writer.close()
  return summary


def _progress_bar(enabled: bool, start_step: int, num_steps: int):
  """The loop's bar; a disabled one when switched off or on processes other than 0."""
  from e4t_jax.progress import progress_bar  # pylint: disable=g-import-not-at-top
  enabled = enabled and jax.process_index() == 0
  return progress_bar(num_steps, 'e4t pretrain', initial=start_step, enabled=enabled)


def _save_model_folder(modules, trainable, frozen, model_dir: str, writer: MetricWriter) -> None:
  from e4t_jax.e4t import io as io_lib  # pylint: disable=g-import-not-at-top
  params = model_lib.merge_params(trainable, frozen)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    params = multihost_utils.process_allgather(params, tiled=True)
  else:
    params = jax.device_get(params)
  if jax.process_index() != 0:
    return
  if '://' in model_dir:
    writer.print(f'not writing {model_dir}: model folders are written to local paths only; '
                 'copy checkpoints or rerun with a local workdir.')
    return
  io_lib.save_model(model_lib.E4TModel(modules, params), model_dir)
  writer.print(f'wrote the E4T model folder {model_dir}')


# ----------------------------------------------------------------------------- command line
def main_pretrain(config_path: str, workdir: str, overrides: Sequence[str] = ()) -> int:
  """`e4t pretrain --config CONFIG --workdir DIR [--config.x=y ...]`: 0 on success (or preemption), 2 on a
  user error (one line on stderr)."""
  from e4t_jax.parallel import multihost  # pylint: disable=g-import-not-at-top
  try:
    if '://' not in workdir:  # a local workdir must be a writable folder before anything loads
      fileio.check_output_dir(workdir, flag='--workdir')
    multihost.initialize_from_env()
    run = config_lib.load_run_config(config_path, list(overrides))
    summary = train_and_evaluate(run, workdir)
  except E4TError as e:
    print(f'e4t: error: {printable(e)}', file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, bool))}), flush=True)
  return 0
