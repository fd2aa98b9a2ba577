"""PyTorch reference implementations the benchmarks compare against, in the same run.

`TorchE4T`: our E4T tuning re-implemented in PyTorch eager on the real diffusers / transformers
networks, loaded from the folders our savers write (parity to the JAX program's own random draws, and
the per-concept latency baseline of `e4t bench personalize --baseline torch`). `torch_unet_step`: a
diffusers U-Net denoising train step, the baseline of `e4t bench full --torch`.

torch, diffusers and transformers are imported inside the functions: the package runs without them.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from e4t_jax import personalize as personalize_lib
from e4t_jax.bench import harness
from e4t_jax.e4t import model as model_lib
from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.errors import ConfigError


class TorchE4T:
  """Our E4T tuning re-implemented in PyTorch eager, on our tiny model's weights; lite and paper mode
  (in paper mode the U-Net's tuned kernels train too, at their own learning rate, on the batch of views).

  The frozen networks are the real diffusers / transformers modules, loaded with `from_pretrained`
  from the folders our savers write (U-Net, VAE, CLIP text, CLIP vision); the E4T encoder is
  re-implemented layer for layer (`e4t/encoder.py`) with our weights copied in; the low-rank offsets
  are merged functionally, W' = W + (down @ up)^T in torch's [out, in] layout, through
  `torch.func.functional_call`. The loss, the Adam update and the w* read-out follow
  `tuning_program` / `e4t_loss` step for step; passes the JAX program does not differentiate (VAE,
  CLIP, the coarse prompt, U-Net pass 1) run under `torch.no_grad`, as `stop_gradient` / closure
  constants make XLA skip their gradients.
  """

  def __init__(self, model: model_lib.E4TModel, work_dir: str | os.PathLike):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModel
    from e4t_jax.convert import common as convert_common
    from e4t_jax.convert.clip import save_image_encoder, save_text_encoder
    from e4t_jax.convert.unet import save_unet
    from e4t_jax.convert.vae import save_vae
    self.torch = torch
    modules, params = model.modules, model.params
    self.modules = modules
    work_dir = Path(work_dir)
    save_unet(work_dir / 'unet', modules.unet.config, params['unet'])
    save_vae(work_dir / 'vae', modules.vae.config, params['vae'])
    save_text_encoder(work_dir / 'text_encoder', modules.text_encoder.config, params['text_encoder'])
    save_image_encoder(work_dir / 'image_encoder', modules.image_encoder.config, params['image_encoder'])
    load = dict(torch_dtype=torch.float32)
    with _quiet_hf_loading():
      self.unet = UNet2DConditionModel.from_pretrained(work_dir / 'unet', **load)
      self.vae = AutoencoderKL.from_pretrained(work_dir / 'vae', **load)
      self.text = CLIPTextModel.from_pretrained(work_dir / 'text_encoder', **load)
      self.vision = CLIPVisionModel.from_pretrained(work_dir / 'image_encoder', **load)
    for module in (self.unet, self.vae, self.text, self.vision):
      module.eval().requires_grad_(False)
    self.unet_params = params['unet']
    self.initial_unet = {k: v.detach().clone() for k, v in self.unet.named_parameters()}  # paper mode resets

    config = modules.config
    if config.trainable_patterns:
      raise ConfigError('the torch baseline trains the encoder and offsets only (no image-encoder patterns).')
    if config.offsets.mode != 'additive':
      raise ConfigError('the torch baseline implements additive weight offsets only.')
    if modules.schedule.prediction_type != 'epsilon':
      raise ConfigError('the torch baseline implements epsilon prediction only.')
    self.config = config
    self.encoder = _torch_encoder(config.encoder, params['encoder'])
    self.initial_encoder_state = {k: v.clone() for k, v in self.encoder.state_dict().items()}
    # Offsets: torch weight key -> initial (down [in, r], up [r, out]).
    self.initial_offsets = {
        convert_common.torch_key(tuple(path.split('/')) + ('kernel',)):
            (torch.tensor(np.asarray(pair['down'])), torch.tensor(np.asarray(pair['up'])))
        for path, pair in params['weight_offsets'].items()}
    unet_weights = dict(self.unet.named_parameters())
    missing = [k for k in self.initial_offsets if k not in unet_weights]
    if missing:
      raise ConfigError(f'offset targets {missing[:3]} are not diffusers U-Net weights.')
    self.alphas_cumprod = torch.tensor(np.asarray(modules.schedule.alphas_cumprod))
    self.coarse_embedding = torch.tensor(np.asarray(
        params['text_encoder']['embeddings']['token_embedding']['embedding'][modules.coarse_token_id], np.float32))
    self.coarse_prompt_ids = torch.tensor(modules.coarse_prompt_ids, dtype=torch.long)
    self.vae_scaling = float(modules.vae.config.scaling_factor)
    self.vae_shift = modules.vae.config.shift_factor
    # The placeholder's embedding is swapped in at the token-table output, as `encode_prompt` does.
    self._substitution = None
    self.text.get_input_embeddings().register_forward_hook(self._substitute_placeholder)

  # --------------------------------------------------------------------------- pieces
  def _substitute_placeholder(self, module, inputs, output):
    if self._substitution is None:
      return output
    mask, w_star = self._substitution
    return self.torch.where(mask[..., None], w_star[:, None, :].to(output.dtype), output)

  def _encode_prompt(self, input_ids, w_star):
    torch = self.torch
    mask = input_ids == self.modules.placeholder_id
    safe_ids = torch.where(mask, torch.full_like(input_ids, self.modules.coarse_token_id), input_ids)
    self._substitution = (mask, w_star)
    try:
      return self.text(input_ids=safe_ids).last_hidden_state
    finally:
      self._substitution = None

  def _latents(self, images, vae_eps):
    posterior = self.vae.encode(images).latent_dist
    sample = posterior.mean + posterior.std * vae_eps
    if self.vae_shift is not None:
      sample = sample - self.vae_shift
    return sample * self.vae_scaling

  def _add_noise(self, latents, noise, timesteps):
    alpha_bar = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise

  def _unet_features(self, sample, timesteps, context):
    """diffusers' contracting path only (conv_in, down blocks, mid block), as `features_only=True`."""
    unet = self.unet
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    hidden = unet.conv_in(sample)
    skips = [hidden]
    for block in unet.down_blocks:
      if getattr(block, 'has_cross_attention', False):
        hidden, block_skips = block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
      else:
        hidden, block_skips = block(hidden_states=hidden, temb=emb)
      skips.extend(block_skips)
    mid = unet.mid_block(hidden, emb, encoder_hidden_states=context)
    return skips, mid

  def _clip_pixels(self, images):
    """`clip_preprocess` of images in [-1, 1] (NCHW)."""
    torch = self.torch
    from e4t_jax.models.clip import CLIP_MEAN, CLIP_STD
    pixels = (images + 1.0) / 2.0
    target = self.modules.image_encoder.config.image_size
    height, width = pixels.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(target * long / short)
    new_size = (target, new_long) if height <= width else (new_long, target)
    if tuple(new_size) != (height, width):
      pixels = torch.nn.functional.interpolate(pixels, size=new_size, mode='bicubic', antialias=True,
                                               align_corners=False).clamp(0.0, 1.0)
    top, left = (new_size[0] - target) // 2, (new_size[1] - target) // 2
    pixels = pixels[..., top:top + target, left:left + target]
    mean = torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).reshape(1, 3, 1, 1)
    return (pixels - mean) / std

  def _predict_offset(self, images, noisy, timesteps):
    """The encoder's f [batch, width]; everything before the encoder is frozen (no graph)."""
    torch = self.torch
    with torch.no_grad():
      coarse_context = self.text(input_ids=self.coarse_prompt_ids.expand(images.shape[0], -1)).last_hidden_state
      down, mid = self._unet_features(noisy, timesteps, coarse_context)
      clip_states = self.vision(pixel_values=self._clip_pixels(images), output_hidden_states=True).hidden_states
    return self.encoder(clip_states, down, mid)

  def loss(self, offsets, images, prompt_ids, vae_eps, noise, timesteps):
    """`e4t_loss` (epsilon target, no mask) for trainable encoder + offsets {key: (down, up)}."""
    torch = self.torch
    with torch.no_grad():
      latents = self._latents(images, vae_eps)
      noisy = self._add_noise(latents, noise, timesteps)
    offset = self._predict_offset(images, noisy, timesteps)
    w_star = self.coarse_embedding[None, :] + self.config.embedding_scale * offset
    context = self._encode_prompt(prompt_ids, w_star)
    weights = dict(self.unet.named_parameters())
    merged = {key: weights[key] + (down @ up).T for key, (down, up) in offsets.items()}
    prediction = torch.func.functional_call(self.unet, merged, (noisy, timesteps),
                                            {'encoder_hidden_states': context}).sample
    diffusion_loss = torch.mean(torch.square(prediction - noise))
    embedding_reg = torch.mean(torch.sum(torch.square(offset), dim=-1))
    offsets_reg = sum(torch.sum((down.T @ down) * (up @ up.T)) for down, up in offsets.values())
    return (diffusion_loss + self.config.lambda_embedding * embedding_reg
            + self.config.lambda_offsets * offsets_reg)

  # --------------------------------------------------------------------------- tuning
  def _tuned_unet_weights(self, tuning: personalize_lib.TuningConfig) -> dict:
    """Paper mode: the diffusers U-Net weights of the kernels `tuned_unet_kernels` picks (torch key -> param)."""
    from e4t_jax.convert import common as convert_common
    weights = dict(self.unet.named_parameters())
    keys = [convert_common.torch_key(tuple(p.split('/')) + ('kernel',))
            for p in personalize_lib.tuned_unet_kernels(self.unet_params, tuning)]
    missing = [k for k in keys if k not in weights]
    if missing:
      raise ConfigError(f'tuned kernels {missing[:3]} are not diffusers U-Net weights.')
    return {k: weights[k] for k in keys}

  def _views(self, image_t, count: int, augment: bool, generator, max_zoom: float = 1.15):
    """`make_views` in torch (for timing; parity runs use the JAX views): view 0 is the image, the others
    mirrored with probability 1/2 and zoomed in by [1, max_zoom] around a random point (bilinear)."""
    torch = self.torch
    views = image_t.expand(count, -1, -1, -1).clone()
    if not augment or count == 1:
      return views
    flip = torch.rand(count, generator=generator) < 0.5
    flip[0] = False
    views[flip] = views[flip].flip(-1)
    zoom = 1.0 + (max_zoom - 1.0) * torch.rand(count, generator=generator)
    zoom[0] = 1.0
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (1 - 1 / zoom)[:, None]
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(theta, list(views.shape), align_corners=False)
    return torch.nn.functional.grid_sample(views, grid, mode='bilinear', align_corners=False)

  def personalize(self, image: np.ndarray, tuning: personalize_lib.TuningConfig, *, draws: dict | None = None,
                  generator=None) -> tuple[list[float], np.ndarray]:
    """Tunes a fresh copy of the encoder and offsets (and in paper mode the U-Net's kernels) on `image`
    ([S, S, 3] float in [0, 1]).

    Random numbers come from `draws` (`_jax_draws`: the JAX program's own, paper mode's views included)
    or, when None, from the torch `generator`. Returns (loss trace, w*).
    """
    torch = self.torch
    paper = tuning.mode == 'paper'
    if tuning.micro_batch not in (None, tuning.batch_size):
      raise ConfigError('the torch baseline tunes on the whole batch at once (no micro_batch).')
    self.encoder.load_state_dict(self.initial_encoder_state)
    offsets = {key: (down.clone().requires_grad_(True), up.clone().requires_grad_(True))
               for key, (down, up) in self.initial_offsets.items()}
    groups = [{'params': list(self.encoder.parameters()) + [t for pair in offsets.values() for t in pair],
               'lr': tuning.learning_rate}]
    unet_weights = self._tuned_unet_weights(tuning) if paper else {}
    for key, weight in unet_weights.items():  # a fresh copy of the domain's U-Net for every concept
      weight.data.copy_(self.initial_unet[key])
      weight.requires_grad_(True)
    if unet_weights:
      groups.append({'params': list(unet_weights.values()), 'lr': tuning.unet_learning_rate})
    optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8)
    batch = tuning.batch_size
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None] * 2.0 - 1.0
    if draws is not None and 'views' in draws:
      images = nchw(draws['views'])
    elif paper or tuning.augment:
      images = self._views(image_t, batch, tuning.augment, generator)
    else:
      images = image_t.expand(batch, -1, -1, -1)
    ids = personalize_lib.tuning_ids(self.modules, tuning)
    prompt_ids = torch.tensor(np.broadcast_to(ids, (batch, ids.shape[-1])), dtype=torch.long)
    side = self.modules.unet.config.sample_size
    latent_shape = (batch, self.modules.unet.config.in_channels, side, side)
    num_timesteps = self.alphas_cumprod.shape[0]
    losses = []
    try:
      for i in range(tuning.num_steps):
        if draws is not None:
          step = draws['steps'][i]
          vae_eps, noise = nchw(step['vae_eps']), nchw(step['noise'])
          timesteps = torch.from_numpy(np.asarray(step['timesteps'], np.int64))
        else:
          vae_eps = torch.randn(latent_shape, generator=generator)
          noise = torch.randn(latent_shape, generator=generator)
          timesteps = torch.randint(0, num_timesteps, (batch,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(offsets, images, prompt_ids, vae_eps, noise, timesteps)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

      # Read-out of w*: the encoder's prediction averaged over fixed timesteps and noise draws, from the
      # image itself (view 0) and the tuned U-Net's contracting path.
      readout_t = torch.tensor(list(tuning.readout_timesteps), dtype=torch.long)
      count = len(readout_t)
      with torch.no_grad():
        if draws is not None:
          vae_eps, noise = nchw(draws['readout']['vae_eps']), nchw(draws['readout']['noise'])
        else:
          vae_eps = torch.randn((1,) + latent_shape[1:], generator=generator)
          noise = torch.randn((count,) + latent_shape[1:], generator=generator)
        latents = self._latents(images[:1], vae_eps).expand(count, -1, -1, -1)
        noisy = self._add_noise(latents, noise, readout_t)
        offset = self._predict_offset(images[:1].expand(count, -1, -1, -1), noisy, readout_t)
        w_star = self.coarse_embedding + self.config.embedding_scale * offset.mean(dim=0)
    finally:
      for key, weight in unet_weights.items():
        weight.requires_grad_(False)
        weight.data.copy_(self.initial_unet[key])
    return losses, w_star.numpy()


@contextlib.contextmanager
def _quiet_hf_loading():
  """Silences diffusers' / transformers' load-time advice and progress bars (benchmark output is a table)."""
  from diffusers.utils import logging as diffusers_logging
  from transformers.utils import logging as transformers_logging
  saved = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity(),
           transformers_logging.is_progress_bar_enabled())
  diffusers_logging.set_verbosity_error()
  transformers_logging.set_verbosity_error()
  transformers_logging.disable_progress_bar()
  try:
    yield
  finally:
    diffusers_logging.set_verbosity(saved[0])
    transformers_logging.set_verbosity(saved[1])
    if saved[2]:
      transformers_logging.enable_progress_bar()


def _torch_encoder(config: EncoderConfig, params: dict):
  """`E4TEncoder` in torch with our weights (Dense kernel [in, out] -> Linear weight [out, in])."""
  import torch
  from torch import nn

  class TorchE4TEncoder(nn.Module):
    def __init__(self):
      super().__init__()
      clip_names = [f'clip_proj_{i}' for i in range(len(config.clip_layers))]
      unet_count = sum(1 for name in params if name.startswith('unet_proj_'))
      self.source_names = clip_names + [f'unet_proj_{i}' for i in range(unet_count)]
      linear = lambda name: nn.Linear(*np.shape(params[name]['kernel']))
      self.projections = nn.ModuleDict({name: linear(name) for name in self.source_names})
      self.mlp = nn.ModuleList([linear(f'mlp_{i}') for i in range(config.mlp_depth)])
      self.out = linear('out')
      with torch.no_grad():
        layers = [(self.projections[n], n) for n in self.source_names]
        layers += [(m, f'mlp_{i}') for i, m in enumerate(self.mlp)] + [(self.out, 'out')]
        for layer, name in layers:
          layer.weight.copy_(torch.tensor(np.asarray(params[name]['kernel']).T))
          layer.bias.copy_(torch.tensor(np.asarray(params[name]['bias'])))

    def forward(self, clip_hidden_states, unet_down, unet_mid):
      sources = []
      for index in config.clip_layers:  # [class token ; mean of patch tokens]
        tokens = clip_hidden_states[index]
        sources.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1))
      tensors = []
      if config.unet_features in ('down+mid', 'down'):
        tensors += list(unet_down)
      if config.unet_features in ('down+mid', 'mid'):
        tensors.append(unet_mid)
      sources += [t.mean(dim=(2, 3)) for t in tensors]  # spatial means (NCHW)
      joint = sum(self.projections[name](x) for name, x in zip(self.source_names, sources))
      hidden = nn.functional.leaky_relu(joint, config.leaky_relu_slope)
      for layer in self.mlp:
        hidden = nn.functional.leaky_relu(layer(hidden), config.leaky_relu_slope)
      return self.out(hidden)

  return TorchE4TEncoder()


def torch_unet_step(batch: int, config_name: str, steps: int, deadline: float) -> dict:
  """diffusers' UNet2DConditionModel, SD architecture, float32 weights, bf16 autocast, AdamW, eager."""
  import torch
  from diffusers import UNet2DConditionModel
  from e4t_jax.models import presets
  from e4t_jax.models.unet import UNetConfig
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  cfg = {'sd15': lambda: presets.sd15()[0], 'sdxl': lambda: presets.sdxl()[0]}.get(config_name, UNetConfig.tiny)()
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**_diffusers_unet_kwargs(cfg)).to(device)
  unet.train()
  optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
  side, tokens = cfg.sample_size, 77
  latents = torch.randn(batch, cfg.in_channels, side, side, device=device)
  context = torch.randn(batch, tokens, cfg.cross_attention_dims()[0], device=device)
  added = None  # SDXL: pooled text embedding + size/crop ids
  if cfg.text_embeds_dim is not None:
    added = {'text_embeds': torch.randn(batch, cfg.text_embeds_dim, device=device),
             'time_ids': torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, device=device)}
  autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)

  def step():
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (batch,), device=device)
    with autocast:
      prediction = unet(latents + noise, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  for _ in range(2):
    step()
  sync()
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  seconds, loss = [], None
  for _ in range(steps):
    if time.time() > deadline - 5:
      break
    t0 = time.perf_counter()
    loss = step()
    sync()
    seconds.append(time.perf_counter() - t0)
  out = {'framework': f'torch {torch.__version__}', 'device': device, 'batch': batch,
         'final_loss': None if loss is None else float(loss),
         'parameters': sum(p.numel() for p in unet.parameters()),
         'attention_processor': type(next(iter(unet.attn_processors.values()))).__name__}
  if device == 'cuda':
    out['peak_memory_bytes'] = int(torch.cuda.max_memory_allocated())
  if seconds:
    out['step'] = harness.latency_stats(seconds)
  return out


def _diffusers_unet_kwargs(cfg) -> dict:
  return {k: v for k, v in cfg.to_diffusers().items() if not k.startswith('_')}
