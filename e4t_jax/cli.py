"""The `e4t` command line: a thin shell over library functions.

Every user mistake surfaces as an `E4TError` and becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import warnings
from pathlib import Path

from e4t_jax import __version__, fileio, interrupts
from e4t_jax.errors import ConfigError, E4TError, InputError, printable
from e4t_jax.limits import MAX_SEED, MAX_STEPS, MAX_VIEWS

EXAMPLES = """examples:
  e4t demo                                         # end to end on the embedded model -> outputs/demo/
  e4t pretrain --config configs/faces.py --workdir runs/faces --config.model.base=sd15/
  e4t pretrain --config tiny --workdir runs/tiny --config.train.num_steps=200
  e4t personalize me.png --out concepts/           # one concept per image (embedded model by default)
  e4t personalize a.jpg b.jpg --model faces/ --steps 15 --out concepts/
  e4t generate concepts/me.e4t.safetensors "a pop-art painting of *" "* wearing a space suit" --out renders/
  e4t generate --image me.png "a photo of * as a knight" --encoder per_step --out renders/   # one program
  e4t personalize me.png --mode paper --steps 15 --out concepts/   # the paper's tuning stage (U-Net too)
  e4t prepare photos/ --out shards/ --num-shards 64 --size 512
  e4t convert check sd15/                          # strictly load a local diffusers Stable Diffusion folder
  e4t convert concept-to-diffusers concepts/me.e4t.safetensors --out me-diffusers/
  e4t bench personalize --config tiny --baseline torch --json bench.json
  e4t eval --methods e4t:0,e4t:5,ti:500 --identities 50 --out results.json   # identity / prompt-fidelity scores
  e4t demo-train --workdir runs/demo --install     # retrain the embedded demo model from scratch (~2 h, 2 CPUs)

A model is an e4t model folder (written by `e4t pretrain` / e4t_jax.save_model); without --model the
embedded demo model is used. Bad input gives one line on stderr and exit code 2.
"""




class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line (`e4t: error: ...`) and exit code 2, like every other error."""

  def error(self, message):
    self.exit(2, f'e4t: error: {printable(message)} (see `{self.prog} --help`)\n')


def _steps(text: str) -> int:
  return _bounded_int(text, 1, MAX_STEPS)


def _views(text: str) -> int:
  return _bounded_int(text, 1, MAX_VIEWS)


def _tuning_config(args: argparse.Namespace, **fields):
  """The TuningConfig of --mode / --views / --micro-batch (one line and exit 2 when they disagree)."""
  from e4t_jax import personalize as personalize_lib
  if args.views is not None:
    fields['batch_size'] = args.views
  if args.micro_batch is not None:
    fields['micro_batch'] = args.micro_batch
  return personalize_lib.TuningConfig(mode=args.mode, **fields)


def _add_tuning_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--mode', choices=('lite', 'paper'), default='lite',
                      help='lite: encoder + weight offsets (KB concepts); paper: also the U-Net, on a batch '
                           'of views (the paper\'s tuning stage; MB concepts, more memory)')
  parser.add_argument('--views', type=_views, default=None,
                      help='views (paper) or noise draws (lite) per step (default 16 / 1)')
  parser.add_argument('--micro-batch', type=_views, default=None,
                      help='views per gradient pass, a divisor of --views (default: all at once); '
                           'smaller needs less memory, same gradient')


def _count(text: str) -> int:
  return _bounded_int(text, 1, 10**6)


def _seed(text: str) -> int:
  return _bounded_int(text, 0, MAX_SEED)


def _bounded_int(text: str, low: int, high: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
  if not low <= value <= high:
    raise argparse.ArgumentTypeError(f'{value} is outside {low}..{high}')
  return value


def _positive(text: str) -> float:
  value = _finite(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f'{text!r} must be > 0')
  return value


def _non_negative(text: str) -> float:
  value = _finite(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'{text!r} must be >= 0')
  return value


def _finite(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f'{text!r} is not a finite number')
  return value


def _model_inputs(model: str | None) -> list[Path]:
  """Folders no output may go into: the model folder read (the embedded one by default)."""
  import e4t_jax
  return [Path(model) if model else e4t_jax.DEMO_MODEL_DIR]


def _check_json_out(path: str | None, flag: str = '--json') -> None:
  """A results file: its folder writable, the path itself not a directory."""
  if path:
    fileio.check_output_dir(Path(path).parent, flag=flag)
    fileio.check_output_files([path], flag=flag)


def _default_methods() -> tuple[str, ...]:
  from e4t_jax.lab.reproduce import DEFAULT_METHODS
  return DEFAULT_METHODS


def _load_model(path: str | None):
  import e4t_jax
  if path is None:
    print('e4t: using the embedded demo model (pass --model DIR for a domain model)', file=sys.stderr)
    return e4t_jax.load_demo()
  return e4t_jax.load(path)


def _progress(iterable, total: int, desc: str):
  from e4t_jax.progress import progress_bar
  return progress_bar(total, desc, 'img', iterable=iterable, tty_only=True)


def _load_masks(folder: str, loaded: list) -> list:
  """The mask of each (path, image) in `folder`: the same file name stem (optional '_mask' suffix), any
  image extension, as `e4t prepare --masks` matches them; each checked against its image now."""
  from e4t_jax import personalize as personalize_lib
  from e4t_jax.data import images as images_lib
  from e4t_jax.data import sources
  from e4t_jax.errors import InputError
  folder_path = Path(folder)
  if not folder_path.is_dir():
    raise InputError(f'--masks {folder}: not a folder; pass the folder holding one mask per image.')
  masks = []
  for path, image in loaded:
    (mask_path,) = sources._match_masks(path.parent, [path], folder_path)  # pylint: disable=protected-access
    mask = images_lib.load_mask_array(mask_path)
    personalize_lib.prepare_mask(mask, min(mask.shape), image, source=str(mask_path))  # aspect, emptiness
    masks.append(mask)
  return masks


def _cmd_personalize(args: argparse.Namespace) -> int:
  import time
  import jax
  import numpy as np
  from e4t_jax import personalize as personalize_lib
  from e4t_jax.data import images as images_lib
  from e4t_jax.errors import DivergenceError, InputError
  paths = [Path(p) for p in args.images]
  # Everything is checked before the model loads or anything compiles.
  out_dir = fileio.check_output_dir(args.out, inputs=_model_inputs(args.model))
  if args.cache_dir:
    fileio.check_output_dir(args.cache_dir, flag='--cache-dir')
  targets = [out_dir / f'{p.stem}.e4t.safetensors' for p in paths]
  seen: dict[Path, Path] = {}
  for path, target in zip(paths, targets):
    if target in seen:
      raise InputError(f'{seen[target]} and {path} share the file name stem {path.stem!r}: their concepts would '
                       'both be written to ' f'{target}; rename one or personalize them into separate --out folders.')
    seen[target] = path
  fileio.check_output_files(targets)
  if args.seed + len(paths) - 1 > MAX_SEED:
    raise InputError(f'--seed {args.seed} + {len(paths)} images passes {MAX_SEED}; pass a smaller --seed.')
  tuning = _tuning_config(args, learning_rate=args.learning_rate,
                          **({} if args.masks is None else {'loss_mask': True}))
  loaded = [(p, images_lib.load_image(p)) for p in paths]
  masks = [None] * len(paths) if args.masks is None else _load_masks(args.masks, loaded)
  model = _load_model(args.model)
  personalize_lib.tuning_prompt_ids(model.modules, personalize_lib.tuning_prompt(model.modules, tuning)
                                    if args.prompt is None else args.prompt)  # placeholder once, not cut
  fileio.sweep_stale_temp_files(out_dir)  # temporary files a killed earlier run left
  print(f'compiling the {args.steps}-step {args.mode}-mode tuning program...', flush=True)
  t0 = time.perf_counter()
  personalize_fn = personalize_lib.make_personalize_fn(model, num_steps=args.steps, tuning=tuning,
                                                       cache_dir=args.cache_dir)
  print(f'compiled the {args.steps}-step {args.mode}-mode tuning program in {time.perf_counter() - t0:.1f} s',
        flush=True)
  timings = []
  for index, ((path, image), target) in enumerate(_progress(zip(loaded, targets), len(loaded), 'personalizing')):
    t0 = time.perf_counter()
    diverged = f'{path}: tuning diverged (NaN/inf); nothing was saved for it; lower --learning-rate (now ' \
               f'{args.learning_rate:g}) or --steps.'
    try:
      concept = personalize_fn(model.params, image, jax.random.key(args.seed + index), prompt=args.prompt,
                               mask=masks[index])
    except DivergenceError:
      raise DivergenceError(diverged) from None
    jax.block_until_ready(concept.embedding)
    timings.append(time.perf_counter() - t0)
    losses = np.asarray(concept.loss_trace)[:int(concept.steps)]
    if not np.isfinite(losses).all() or concept.non_finite():  # the program stops at a NaN; never save one
      raise DivergenceError(diverged)
    concept.save(target)
    print(f'{printable(path)} -> {printable(target)} ({target.stat().st_size / 1024:.1f} KiB, {timings[-1]:.2f} s, '
          f'final loss {float(losses[-1]):.4f})', flush=True)
  print(f'{len(paths)} concept(s) in {printable(out_dir)}/, {sum(timings) / len(timings):.2f} s per concept after compile')
  return 0


def _cmd_generate(args: argparse.Namespace) -> int:
  import jax
  from e4t_jax import generation as generate_lib
  from e4t_jax import personalize as personalize_lib
  from e4t_jax.data import images as images_lib
  from e4t_jax.e4t.concept import Concept
  from e4t_jax.errors import InputError
  # Everything is checked before the model loads or anything compiles.
  prompts = [args.concept] + list(args.prompts) if args.image is not None else list(args.prompts)
  if args.image is None and not args.prompts:
    raise InputError('give a concept file (or "none") and at least one prompt, or --image IMAGE and prompts.')
  if args.image is None and args.encoder == 'per_step':
    raise InputError("--encoder per_step reads the concept's tuned encoder at every step, which a concept "
                     'file does not hold; pass --image IMAGE to tune and render in one run.')
  if args.seed + len(prompts) - 1 > MAX_SEED:
    raise InputError(f'--seed {args.seed} + {len(prompts)} prompts passes {MAX_SEED}; pass a smaller --seed.')
  out_dir = fileio.check_output_dir(args.out, inputs=_model_inputs(args.model))
  fileio.check_output_files(generate_lib.output_paths(out_dir, prompts, args.seed))
  if args.image is not None:  # personalize + generate in one program: every positional is a prompt
    image = images_lib.load_image(args.image)
    tuning = personalize_lib.TuningConfig(mode=args.mode)
    concept = None
  else:
    concept = Concept.load(args.concept) if args.concept and args.concept != 'none' else None
  model = _load_model(args.model)
  fileio.sweep_stale_temp_files(out_dir)
  settings = {'steps': args.steps, 'guidance_scale': args.guidance_scale, 'sampler': args.sampler,
              'seed': args.seed, 'concept': args.concept if args.image is None else None, 'image': args.image,
              'encoder': args.encoder}
  sampling = dict(num_steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler, seed=args.seed)
  with _warnings_as_lines():
    if concept is not None:
      concept.check_compatible(model)  # before compiling: another model's concept, NaNs, shapes
    if args.image is not None:
      settings.update(mode=args.mode, tuning_steps=args.tuning_steps)
      images = generate_lib.personalize_and_generate(
          model, image, prompts, args.negative_prompt, tuning=tuning, num_tuning_steps=args.tuning_steps,
          encoder=args.encoder, rng=jax.random.key(args.seed), **sampling)
    else:
      images = generate_lib.generate(model, concept, prompts, args.negative_prompt, **sampling)
  paths = generate_lib.save_images(images, out_dir, prompts, settings)
  print(f'{len(prompts)} image(s) and the grid {printable(paths[-1])} written to {printable(out_dir)}/')
  return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
  from e4t_jax.data.sources import write_array_record_shards
  fileio.check_output_dir(args.out, inputs=[args.folder])
  shards = write_array_record_shards(args.folder, args.out, args.num_shards, size=args.size,
                                     mask_folder=args.masks)
  print(f'{len(shards)} ArrayRecord shard(s) in {args.out}/ (see manifest.json for counts and skipped files)')
  return 0


def _cmd_export(args: argparse.Namespace) -> int:
  from e4t_jax.e4t.export import export_concept_to_diffusers
  from e4t_jax.e4t.concept import Concept
  out_dir = fileio.check_output_dir(args.out, inputs=_model_inputs(args.model))
  concept = Concept.load(args.concept)
  model = _load_model(args.model)
  with _warnings_as_lines():
    concept.check_compatible(model)
    result = export_concept_to_diffusers(concept, model, out_dir, token=args.token)
  print(f'textual inversion: {result.embedding}\nLoRA: {result.lora}\nusage: {result.readme} '
        f'(token {printable(result.token)!r})')
  return 0


def _cmd_diffusers_to_e4t(args: argparse.Namespace) -> int:
  import jax
  from e4t_jax.convert import load_image_encoder, load_stable_diffusion
  from e4t_jax.e4t import io, model as model_lib
  fileio.check_output_dir(args.out, inputs=[args.sd_dir, args.image_encoder])
  sd = load_stable_diffusion(args.sd_dir)
  vision, vision_params = load_image_encoder(args.image_encoder)
  config = model_lib.E4TConfig(coarse_word=args.coarse_word, placeholder=args.placeholder)
  model = model_lib.init_e4t(jax.random.key(args.seed), config, sd, vision, vision_params)
  io.save_model(model, args.out)
  print(f'{args.out}/: an untrained E4T model (fresh encoder, zero weight offsets) on {args.sd_dir}; '
        'pretrain it with `e4t pretrain`.')
  return 0


def _cmd_e4t_to_diffusers(args: argparse.Namespace) -> int:
  from e4t_jax.convert import save_image_encoder, save_stable_diffusion
  from e4t_jax.e4t import io
  fileio.check_output_dir(args.out, inputs=[args.model_dir])
  model = io.load_model(args.model_dir)
  m = model.modules
  save_stable_diffusion(args.out, model.base_pipeline())
  save_image_encoder(Path(args.out) / 'image_encoder', m.image_encoder.config, model.params['image_encoder'])
  print(f'{args.out}/: the base Stable Diffusion folder (diffusers) + image_encoder/ (transformers). '
        'Concepts carry the weight offsets: export them with `e4t convert concept-to-diffusers`.')
  return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
  from e4t_jax.train import loop
  return loop.main_pretrain(args.config, args.workdir, args.overrides)


def _cmd_bench_full(args: argparse.Namespace) -> int:
  from e4t_jax.bench import full as bench_full
  _check_json_out(args.json)
  result = bench_full.run_full_bench(args.config, json_out=args.json, deadline_s=args.deadline_s,
                                     parallel=args.parallel, num_concepts=args.concepts,
                                     train_steps=args.train_steps, train_batch=args.train_batch,
                                     torch_baseline=not args.no_torch, minimal=args.minimal,
                                     log=lambda line: print(line, file=sys.stderr, flush=True))
  print(bench_full.format_table(result))
  return 0


# The names of `e4t_jax.bench.demo_train.VARIANTS` (listed here so that --help imports no JAX).
_DEMO_TRAIN_VARIANTS = ('baseline', 'batch48', 'batch96', 'bfloat16', '2-devices', 'xla-deferred', 'eigen-convs', 'no-xnnpack',
                        'onednn-dots', 'fast-math', 'wider', 'combined', 'profile')


def _cmd_bench_demo_train(args: argparse.Namespace) -> int:
  from e4t_jax.bench import demo_train as bench_demo
  _check_json_out(args.json)
  variants = bench_demo.parse_variants(args.variants)  # before any work
  result = bench_demo.run_demo_train_bench(variants, seconds=args.seconds, smoke=args.smoke, json_out=args.json,
                                           log=lambda line: print(line, file=sys.stderr, flush=True))
  print(bench_demo.format_table(result))
  return 0 if not result['errors'] else 1


def _cmd_bench(args: argparse.Namespace) -> int:
  from e4t_jax.bench import personalize as bench
  _check_json_out(args.json)
  variants = bench.ABSTRACT_DTYPES
  if args.variants is not None:
    if not args.abstract:
      raise ConfigError('--variants selects what --abstract compiles; add --abstract.')
    variants = tuple(v.strip() for v in args.variants.split(',') if v.strip())
    for name in variants:
      bench.parse_variant(name)
  result = bench.run_personalize_bench(args.config, num_steps=args.steps, num_concepts=args.concepts,
                                       baseline=args.baseline, abstract=args.abstract, json_out=args.json,
                                       mode=args.mode, micro_batch=args.micro_batch, variants=variants)
  print(bench.format_table(result))
  return 0


def _cmd_bench_tpu(args: argparse.Namespace) -> int:
  import json
  from e4t_jax.bench import tpu
  _check_json_out(args.json)
  axes = ('data', 'fsdp', 'tensor')
  given = {axis: getattr(args, axis) for axis in axes if getattr(args, axis) is not None}
  mesh = {axis: given.get(axis, 1) for axis in axes} if given else None  # None: every chip on fsdp
  tuning = _tuning_config(args, num_steps=args.steps)
  reports = [tpu.compile_report(args.config, program, args.topology, mesh, dtype=args.dtype, tuning=tuning,
                                remat=args.remat, batch=args.batch, attention=args.attention,
                                slices=args.slices, scan_clip=args.clip_layers == 'scanned')
             for program in (tpu.PROGRAMS if args.program == 'all' else (args.program,))]
  for r in reports:
    peak, hbm = r['peak_bytes_per_chip'], r['hbm_bytes']
    where = r['topology'] if r['slices'] == 1 else f"{r['slices']} x {r['topology']}"
    print(f"{r['program']:>12} on {where} ({r['device_kind']}, {r['chips']} chip(s), mesh {r['mesh']}): "
          f"peak {peak / 2**30:.2f} GiB per chip of {hbm / 2**30 if hbm else float('nan'):.0f} GiB -> "
          f"{'fits' if r['fits'] else 'does NOT fit' if r['fits'] is False else '?'}; "
          f"{(r['flops'] or 0) / 1e12:.3f} TFLOP; collectives {r['collectives']}; compiled in {r['compile_s']:.1f} s")
  if args.json:
    fileio.atomic_write_bytes(args.json, [json.dumps(reports, indent=2).encode()])
  return 0


def _cmd_demo(args: argparse.Namespace) -> int:
  from e4t_jax.lab import demo
  fileio.check_output_dir(args.out, inputs=_model_inputs(None))
  demo.run(Path(args.out), seed=args.seed)
  return 0


def _cmd_demo_train(args: argparse.Namespace) -> int:
  import e4t_jax
  from e4t_jax.lab import demo_train
  if args.preset == 'accelerator':
    config = demo_train.DemoTrainConfig.accelerator(smoke=args.smoke, seed=args.seed)
  else:
    config = demo_train.DemoTrainConfig.smoke(seed=args.seed) if args.smoke else demo_train.DemoTrainConfig(
        seed=args.seed)
  if args.t2i_steps is not None:
    config = dataclasses.replace(config, t2i_steps=args.t2i_steps)
  if args.t2i_round:
    config = dataclasses.replace(config, t2i_rounds=config.t2i_rounds + tuple(
        demo_train.T2IRound.parse(text) for text in args.t2i_round))
  if args.base_from is not None and not (Path(args.base_from) / 'training.json').is_file():
    raise InputError(f'--base-from {args.base_from}: no training.json; pass a model folder written by '
                     f'e4t demo-train (the shipped one: {e4t_jax.DEMO_MODEL_DIR}).')
  if args.e4t_set:
    config = demo_train.with_e4t_settings(config, args.e4t_set)
    if not args.variant:
      raise ConfigError('--e4t-set trains an E4T stage beside the main one: name it with --variant NAME '
                        '(its model goes to WORKDIR/model-NAME/).')
  if args.install and (args.ablation or args.variant):
    raise ConfigError('--install ships the main model only; train an ablation or a variant without --install.')
  if args.reserve is not None and args.time_limit is None:
    raise ConfigError('--reserve is the part of --time-limit kept for the E4T stage: give --time-limit too.')
  if args.readout_from is not None and not Path(args.readout_from).is_file():
    raise InputError(f'--readout-from {args.readout_from}: no such file (a readout.safetensors, e.g. '
                     f'{e4t_jax.DEMO_MODEL_DIR / "readout.safetensors"}).')
  fileio.check_output_dir(args.workdir, flag='--workdir', inputs=_model_inputs(None))
  try:
    demo_train.run(args.workdir, config, install_to=e4t_jax.DEMO_MODEL_DIR if args.install else None,
                   ablation=args.ablation, render_workers=args.render_workers, time_limit_s=args.time_limit,
                   reserve_s=args.reserve or 0.0, readout_from=args.readout_from, base_from=args.base_from,
                   variant=args.variant)
  except demo_train.DeadlineReached as e:
    print(f'e4t: {printable(e)}; run the same command again to resume.', file=sys.stderr)
    return 3
  return 0


def _cmd_eval(args: argparse.Namespace) -> int:
  from e4t_jax.lab import reproduce
  methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  for method in methods:  # validate before any work
    reproduce.parse_method(method)
  _check_json_out(args.out, flag='--out')
  results = reproduce.run(args.model, args.out, methods, num_identities=args.identities, seed=args.seed,
                          label=args.label, grids=not args.no_grids, encoder=args.encoder,
                          loss_mask=args.loss_mask)
  print(reproduce.markdown_table(results))
  attributes = reproduce.attribute_table(results)
  if attributes:
    print('\nidentity attributes found by the read-out:\n' + attributes)
  plot_path = Path(args.out).with_name(Path(args.out).stem + '-scores.png')
  reproduce.plot(results, plot_path)
  print(f'results in {args.out}, plot in {plot_path}')
  return 0


def _cmd_convert_check(args: argparse.Namespace) -> int:
  from e4t_jax.convert import pipeline
  sd = pipeline.load_stable_diffusion(args.model_dir)
  for name, count in pipeline.parameter_counts(sd).items():
    print(f'{name:>14}: {count / 1e6:9.2f} M parameters')
  print(f'{args.model_dir}: all tensors present, none unexpected, all shapes match.')
  return 0


@contextlib.contextmanager
def _warnings_as_lines():
  """Prints each e4t warning raised inside as one escaped `e4t: warning:` line on stderr."""
  from e4t_jax.errors import E4TWarning
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', E4TWarning)
    try:
      yield
    finally:
      shown = set()
      for warning in caught:
        if issubclass(warning.category, E4TWarning):
          if str(warning.message) not in shown:  # a check repeated by a lower layer warns once
            print(f'e4t: warning: {printable(warning.message)}', file=sys.stderr)
          shown.add(str(warning.message))
        else:
          warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog='e4t', description='E4T: encoder-based domain tuning for fast text-to-image personalization (JAX).',
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--version', action='version', version=f'e4t-jax {__version__}')
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  demo = sub.add_parser('demo', help='personalize 3 unseen identities with the embedded demo model, render, score')
  demo.add_argument('--out', default='outputs/demo', help='output directory (default: outputs/demo)')
  demo.add_argument('--seed', type=_seed, default=0)
  demo.set_defaults(func=_cmd_demo)

  pretrain = sub.add_parser(
      'pretrain', help='domain pretraining (resumes from the latest checkpoint in --workdir)',
      description='Overrides follow the config: --config.optimizer.learning_rate=1e-4 --config.train.num_steps=500')
  pretrain.add_argument('--config', default='configs/tiny.py', help='a configs/*.py file or its name (tiny, faces, …)')
  pretrain.add_argument('--workdir', required=True, help='checkpoints, metrics.jsonl and the final model/')
  pretrain.set_defaults(func=_cmd_pretrain, overrides=[])

  personalize = sub.add_parser('personalize', help='personalize the model to each image (a concept file each)')
  personalize.add_argument('images', nargs='+', help='image files (jpg/png/webp; non-square images are center-cropped)')
  personalize.add_argument('--out', required=True, help='output directory for <image-stem>.e4t.safetensors')
  personalize.add_argument('--model', help='e4t model folder (default: the embedded demo model)')
  personalize.add_argument('--steps', type=_steps, default=5, help=f'tuning steps, 1..{MAX_STEPS} (default 5)')
  personalize.add_argument('--learning-rate', type=_positive, default=1e-4, help='of the encoder and the offsets')
  _add_tuning_arguments(personalize)
  personalize.add_argument('--masks', default=None,
                           help='folder of subject masks named like the images (white = subject): the tuning '
                                'loss is weighted by them')
  personalize.add_argument('--seed', type=_seed, default=0, help=f'0..{MAX_SEED}; image i uses seed + i')
  personalize.add_argument('--prompt', default=None,
                           help='tuning prompt describing the image, "{}" = the concept (default: the model\'s)')
  personalize.add_argument('--cache-dir', help='persistent compilation cache (default: $E4T_CACHE_DIR, else '
                           '~/.cache/e4t-jax/xla; "none": no cache)')
  personalize.set_defaults(func=_cmd_personalize)

  generate = sub.add_parser('generate', help='render prompts with a concept ("*" is the concept)')
  generate.add_argument('concept', help='a .e4t.safetensors concept file, or "none" for the plain model (with '
                        '--image: the first prompt)')
  generate.add_argument('prompts', nargs='*', help='prompts; "*" stands for the concept')
  generate.add_argument('--image', default=None,
                        help='personalize to this image and render in one compiled program (nothing saved)')
  generate.add_argument('--mode', choices=('lite', 'paper'), default='lite', help='with --image: the tuning mode')
  generate.add_argument('--tuning-steps', type=_steps, default=5, help='with --image: tuning steps (default 5)')
  generate.add_argument('--encoder', choices=('averaged', 'per_step'), default='averaged',
                        help='with --image: per_step re-reads the concept at every denoising step (the paper\'s)')
  generate.add_argument('--out', required=True, help='output directory (PNGs + JSON sidecars + grid.png)')
  generate.add_argument('--model', help='e4t model folder (default: the embedded demo model)')
  generate.add_argument('--negative-prompt', default=None)
  generate.add_argument('--steps', type=_steps, default=25, help=f'denoising steps, 1..{MAX_STEPS}')
  generate.add_argument('--guidance-scale', type=_non_negative, default=7.5, help='classifier-free guidance (1: none)')
  generate.add_argument('--sampler', default='dpmpp_2m', choices=['dpmpp_2m', 'ddim'])
  generate.add_argument('--seed', type=_seed, default=0, help=f'0..{MAX_SEED}; prompt i uses seed + i')
  generate.set_defaults(func=_cmd_generate)

  evaluate = sub.add_parser(
      'eval', help='identity and prompt-fidelity scores of personalization methods (synthetic face domain)',
      description='Each held-out identity is given as one image; its concept renders 4 new contexts; the '
      'read-out scores identity and prompt fidelity. Results accumulate in --out (reruns skip done methods).')
  evaluate.add_argument('--model', help='e4t model folder of the synthetic domain (default: the embedded demo model)')
  evaluate.add_argument('--methods', default=','.join(_default_methods()),
                        help='comma-separated KIND:STEPS, KIND in e4t (lite tuning), e4t_paper (paper), textual_inversion (ti), dreambooth (db)')
  evaluate.add_argument('--identities', type=_count, default=50, help='held-out identities (default 50)')
  evaluate.add_argument('--seed', type=_seed, default=0)
  evaluate.add_argument('--label', default='', help='prefix of the result names (e.g. "no-offsets/")')
  evaluate.add_argument('--out', default='outputs/eval/results.json')
  evaluate.add_argument('--no-grids', action='store_true', help='do not write a sample grid per method')
  evaluate.add_argument('--encoder', choices=('averaged', 'per_step'), default='averaged',
                        help='how E4T concepts are read while sampling (per_step: the paper\'s; pair it with --label)')
  evaluate.add_argument('--loss-mask', action='store_true',
                        help='E4T tuning weights its loss by the input\'s face mask (pair it with --label)')
  evaluate.set_defaults(func=_cmd_eval)

  demo_train = sub.add_parser('demo-train', help='train the embedded demo model from scratch (synthetic faces)')
  demo_train.add_argument('--workdir', required=True, help='stage outputs; a rerun resumes after the last finished stage')
  demo_train.add_argument('--install', action='store_true', help='copy the result into the package (load_demo)')
  demo_train.add_argument('--smoke', action='store_true', help='a seconds-long run of every stage (testing)')
  demo_train.add_argument('--preset', choices=('cpu', 'accelerator'), default='cpu',
                          help="sizes: 'cpu' (the shipped model's) or 'accelerator' (one GPU: launch/demo_train_gpu.sh)")
  demo_train.add_argument('--t2i-steps', type=lambda t: _bounded_int(t, 1, 10**7), default=None,
                          help="text-to-image steps (the 'accelerator' preset's maximum; training.json records what ran)")
  demo_train.add_argument('--time-limit', type=_positive, default=None, metavar='SECONDS',
                          help='stop (checkpointed, exit 3) once this many seconds have passed; a rerun resumes')
  demo_train.add_argument('--reserve', type=_positive, default=None, metavar='SECONDS',
                          help="with --time-limit and the 'accelerator' preset: end the text-to-image stage this "
                               'long before the limit, as finished, leaving the time to the E4T stage')
  demo_train.add_argument('--render-workers', type=lambda t: _bounded_int(t, 0, 256), default=0,
                          help='processes rendering the data pool (the same pool for any number)')
  demo_train.add_argument('--readout-from', default=None, metavar='READOUT',
                          help="use this trained judge (e.g. the shipped model's readout.safetensors) instead of "
                               'training one: scores stay comparable across models')
  demo_train.add_argument('--t2i-round', action='append', default=[], metavar='STEPS:LR[:GAMMA]',
                          help='a continuation round of the text-to-image stage after the preset\'s own rounds '
                               '(from its float16 weights, fresh AdamW; GAMMA: min-SNR loss weighting); repeatable')
  demo_train.add_argument('--base-from', default=None, metavar='MODEL',
                          help='continue this demo-train model folder (e.g. the shipped one): its stages are '
                               'reused and only the --t2i-round rounds it lacks and the E4T stage train')
  demo_train.add_argument('--seed', type=_seed, default=0)
  demo_train.add_argument('--ablation', default='',
                          choices=['', 'no_offsets', 'no_embedding_reg', 'weak_embedding_reg'],
                          help='retrain only the E4T stage without weight offsets / the embedding regularizer, '
                               'or with the regularizer at a tenth')
  demo_train.add_argument('--e4t-set', action='append', default=[], metavar='NAME=VALUE',
                          help='an E4T stage setting (steps, batch, lr, lambda_embedding, min_snr_gamma, loss_mask, '
                               'data_workers) for a --variant; repeatable')
  demo_train.add_argument('--variant', default='', metavar='NAME',
                          help='train the E4T stage again on the same base stages into WORKDIR/e4t-NAME and '
                               'WORKDIR/model-NAME (with --e4t-set)')
  demo_train.set_defaults(func=_cmd_demo_train)

  prepare = sub.add_parser('prepare', help='pack an image folder into ArrayRecord shards for pretraining')
  prepare.add_argument('folder', help='image folder (searched recursively)')
  prepare.add_argument('--out', required=True)
  prepare.add_argument('--num-shards', type=_count, default=16)
  prepare.add_argument('--size', type=_count, default=None, help='center-crop + resize to SIZE (default: keep files)')
  prepare.add_argument('--masks', default=None, help='folder of loss masks with matching names (faces)')
  prepare.set_defaults(func=_cmd_prepare)

  bench = sub.add_parser('bench', help='benchmarks (JSON output)')
  bench_sub = bench.add_subparsers(dest='bench_command', required=True, metavar='WHAT')
  bench_personalize = bench_sub.add_parser('personalize', help='compile time, per-concept latency, memory')
  bench_personalize.add_argument('--config', default='tiny')
  bench_personalize.add_argument('--steps', type=_steps, default=5)
  bench_personalize.add_argument('--concepts', type=_count, default=20)
  bench_personalize.add_argument('--baseline', choices=['torch'], default=None)
  bench_personalize.add_argument('--abstract', action='store_true', help='full-size AOT analysis, no weights')
  bench_personalize.add_argument('--mode', choices=('lite', 'paper'), default='lite', help='the tuning mode measured')
  bench_personalize.add_argument('--micro-batch', type=_views, default=None,
                                 help='views per gradient pass (default: all at once)')
  bench_personalize.add_argument('--variants', default=None,
                                 help='--abstract: comma-separated variants to compile (default: float32,bfloat16,'
                                      'float32+remat,bfloat16+remat; "+unrolled" unrolls the CLIP layers, e.g. '
                                      'float32,float32+unrolled for the scan\'s compile-time ratio)')
  bench_personalize.add_argument('--json', default=None, help='write the results here')
  bench_personalize.set_defaults(func=_cmd_bench)
  bench_tpu = bench_sub.add_parser('tpu', help='AOT-compile for a Cloud TPU topology from this machine (needs libtpu)')
  bench_tpu.add_argument('--topology', required=True, help='e.g. v5e:2x2, v5e:4x4, v5p:2x2x2')
  bench_tpu.add_argument('--slices', type=_count, default=1,
                         help='multi-slice: this many copies of the topology over the data-center network '
                              '(the pretraining mesh\'s data axis spans them)')
  bench_tpu.add_argument('--config', default='tiny', help="'tiny', 'sd15' or 'sdxl'")
  bench_tpu.add_argument('--program', choices=('personalize', 'pretrain', 'all'), default='all')
  bench_tpu.add_argument('--dtype', choices=('bfloat16', 'float32'), default='bfloat16')
  for axis in ('data', 'fsdp', 'tensor'):
    bench_tpu.add_argument(f'--mesh.{axis}', dest=axis, type=_count, default=None,
                           help='pretraining mesh axis (default: every chip on fsdp)')
  bench_tpu.add_argument('--steps', type=_steps, default=5, help='personalize: tuning steps (default 5)')
  bench_tpu.add_argument('--batch', type=_count, default=None,
                         help='pretrain: the global batch, a multiple of data x fsdp (default 2 per device)')
  _add_tuning_arguments(bench_tpu)
  bench_tpu.add_argument('--remat', choices=('none', 'nothing_saveable', 'dots_saveable'), default='none',
                         help="the U-Net's per-block rematerialization policy")
  bench_tpu.add_argument('--attention', choices=('auto', 'xla'), default='auto',
                         help="'auto': the Pallas TPU flash attention where it applies; 'xla': the reference")
  bench_tpu.add_argument('--clip-layers', choices=('scanned', 'unrolled'), default='scanned',
                         help="the CLIP towers' layers as one scanned layer (default) or unrolled (to compare)")
  bench_tpu.add_argument('--json', default=None)
  bench_tpu.set_defaults(func=_cmd_bench_tpu)
  bench_full = bench_sub.add_parser(
      'full', help='full size on an accelerator: latency, memory, MFU, fused attention, PyTorch baseline')
  bench_full.add_argument('--config', default='sd15', help="'sd15' or 'sdxl' (full size) or 'tiny' (a smoke run)")
  bench_full.add_argument('--deadline-s', type=_positive, default=480.0, help='stop measuring after this long')
  bench_full.add_argument('--parallel', type=_count, default=4, help='compile worker processes at a time')
  bench_full.add_argument('--concepts', type=_count, default=100, help='concepts timed one by one')
  bench_full.add_argument('--train-steps', type=_count, default=10)
  bench_full.add_argument('--train-batch', type=_count, default=8)
  bench_full.add_argument('--no-torch', action='store_true', help='skip the PyTorch U-Net baseline')
  bench_full.add_argument('--minimal', action='store_true',
                          help='only the headline programs (no remat/float32/attention variants): a short lease')
  bench_full.add_argument('--json', default=None, help='write the results here (rewritten as they come)')
  bench_full.set_defaults(func=_cmd_bench_full)
  bench_demo = bench_sub.add_parser(
      'demo-train', help="the demo model's CPU training step: variants (batch, dtype, XLA:CPU flags, devices) and a profile")
  bench_demo.add_argument('--variants', default=None,
                          help='comma-separated, from: ' + ', '.join(_DEMO_TRAIN_VARIANTS) + ' (default: all)')
  bench_demo.add_argument('--seconds', type=_positive, default=30.0, help='time each variant for this long')
  bench_demo.add_argument('--smoke', action='store_true', help="the smoke run's tiny sizes (a test)")
  bench_demo.add_argument('--json', default=None, help='write the results here')
  bench_demo.set_defaults(func=_cmd_bench_demo_train)

  convert = sub.add_parser('convert', help='convert / check model weights, export concepts')
  convert_sub = convert.add_subparsers(dest='convert_command', required=True, metavar='WHAT')
  check = convert_sub.add_parser('check', help='strictly load a local diffusers Stable Diffusion folder')
  check.add_argument('model_dir', help='folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/')
  check.set_defaults(func=_cmd_convert_check)
  export = convert_sub.add_parser('concept-to-diffusers',
                                  help='textual-inversion embedding + U-Net LoRA that diffusers pipelines load')
  export.add_argument('concept')
  export.add_argument('--out', required=True)
  export.add_argument('--model', help='the e4t model folder the concept was made with (default: embedded)')
  export.add_argument('--token', default=None, help='token to register in diffusers (default <e4t-concept>)')
  export.set_defaults(func=_cmd_export)
  to_e4t = convert_sub.add_parser('diffusers-to-e4t', help='a diffusers SD folder + CLIP vision tower -> an e4t model')
  to_e4t.add_argument('sd_dir')
  to_e4t.add_argument('--image-encoder', required=True, help='transformers CLIPVisionModel / CLIPModel folder')
  to_e4t.add_argument('--out', required=True)
  to_e4t.add_argument('--coarse-word', default='face')
  to_e4t.add_argument('--placeholder', default='*')
  to_e4t.add_argument('--seed', type=_seed, default=0)
  to_e4t.set_defaults(func=_cmd_diffusers_to_e4t)
  to_diffusers = convert_sub.add_parser('e4t-to-diffusers', help='an e4t model -> diffusers SD folder + image encoder')
  to_diffusers.add_argument('model_dir')
  to_diffusers.add_argument('--out', required=True)
  to_diffusers.set_defaults(func=_cmd_e4t_to_diffusers)
  return parser


# Commands whose compiles go to the persistent cache by default (benchmarks time cold compiles: not them).
CACHED_COMMANDS = ('personalize', 'generate', 'demo', 'eval', 'pretrain', 'demo-train')


def _compilation_cache(args: argparse.Namespace) -> None:
  """Turns on the persistent XLA compilation cache for the commands that compile (a second process with
  the same shapes loads its executables instead of compiling): --cache-dir where the command has it, else
  $E4T_CACHE_DIR, else ~/.cache/e4t-jax/xla ('none' / 'off' in either: no cache). An explicit folder must be
  writable (exit 2); an unwritable default is skipped with a one-line note."""
  if args.command not in CACHED_COMMANDS:
    return
  from e4t_jax import runtime
  explicit = getattr(args, 'cache_dir', None)
  if runtime.cache_disabled(explicit):
    args.cache_dir = None
    return
  if explicit:
    return  # the command enables it (after checking the folder with its other outputs)
  folder = runtime.default_cache_dir()
  if folder is None:
    return
  try:
    fileio.check_output_dir(folder, flag=f'${runtime.CACHE_DIR_ENV}')
    runtime.enable_compilation_cache(folder, max_bytes=runtime.DEFAULT_CACHE_MAX_BYTES)
  except (E4TError, OSError) as e:
    if os.environ.get(runtime.CACHE_DIR_ENV):
      raise ConfigError(f'{printable(e)} (set {runtime.CACHE_DIR_ENV}=off for no compilation cache)') from None
    print(f'e4t: note: no compilation cache ({printable(e)}); set {runtime.CACHE_DIR_ENV} to a writable folder',
          file=sys.stderr)


def main(argv: list[str] | None = None, *, handle_signals: bool | None = None) -> int:
  """The `e4t` command. `handle_signals` (default: when `argv` is None, i.e. a real command line) installs
  the clean-exit handlers of `e4t_jax.interrupts` for SIGINT/SIGTERM/SIGHUP."""
  words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith('-')]
  if (argv is None if handle_signals is None else handle_signals) and words[:1] not in (['pretrain'], ['demo-train']):
    interrupts.install()  # first thing; pretrain and demo-train checkpoint and resume on their own terms
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  overrides = [a for a in unknown if a.startswith('--config.')]
  if len(overrides) != len(unknown) or (overrides and args.command != 'pretrain'):
    parser.error(f'unrecognized arguments: {" ".join(a for a in unknown if a not in overrides) or " ".join(overrides)}')
  if args.command == 'pretrain':
    args.overrides = overrides
  try:
    _compilation_cache(args)
    return int(args.func(args) or 0)
  except E4TError as e:
    print(f'e4t: error: {printable(e)}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('e4t: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
