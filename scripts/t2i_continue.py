"""Scaling probe (issue 17): continue the shipped demo model's text-to-image stage (U-Net + text encoder, from its
float16 weights, fresh AdamW) for STEPS more steps and score `described` and `coarse` on the `e4t eval` protocol every
CHUNK steps. A measurement, not a training path:
  python scripts/t2i_continue.py STEPS LR CHUNK OUT.json [FIELD=VALUE ...]
FIELD=VALUE: DemoTrainConfig overrides of the stage's loss and batches (e.g. t2i_min_snr_gamma=5)."""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
import e4t_jax
from e4t_jax.e4t import model as model_lib
from e4t_jax.lab import demo_train as D, evaluate as E, reproduce as R
from e4t_jax.models import clip as clip_lib
from e4t_jax.models.vae import AutoencoderKL
steps, lr, chunk = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
out = sys.argv[4]
overrides = sys.argv[5:]
config = D.with_overrides(D.DemoTrainConfig(), overrides)
print('config overrides', overrides, flush=True)
model = e4t_jax.load_demo()
readout = E.ReadoutModel.load(e4t_jax.DEMO_MODEL_DIR / 'readout.safetensors')
unet_config, vae_config, text_config, _ = D.architecture(config)
t = time.time(); pool = D.render_pool(config.pool_size, config.seed); print('pool', round(time.time() - t), flush=True)
f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
vae_params = f32(model.params['vae'])
latents = D.encode_pool(AutoencoderKL(model.modules.vae.config), vae_params, pool['images'])
loss_fn, init, batches = D.t2i_problem(config, unet_config, text_config, latents, pool,
                                       model.modules.vae.config.scaling_factor, attention='xla_deferred')
params = {'unet': f32(model.params['unet']), 'text_encoder': clip_lib.unstack_layers(f32(model.params['text_encoder']))}
assert jax.tree.structure(params) == jax.tree.structure(init)
optimizer = D._adamw(lr, steps, warmup=100)
step = jax.jit(D.fit_step(loss_fn, optimizer, config.ema_decay))
state = (params, params, optimizer.init(params))
cases = R.protocol(50, seed=0)
results = {}
def score(label, ema):
  p = dict(model.params, unet=ema['unet'], text_encoder=clip_lib.stack_layers(ema['text_encoder']))
  m = model_lib.E4TModel(model.modules, p)
  for kind in ('described', 'coarse'):
    r = R.evaluate_method(m, readout, kind, 0, cases, progress=False)
    results[f'{label}/{kind}'] = {'identity': r['identity']['mean'], 'ci95': r['identity']['ci95'],
                                  'prompt_fidelity': r['prompt_fidelity']['mean'],
                                  'attributes': r['identity_attributes']}
    print(label, kind, round(r['identity']['mean'], 3), round(r['prompt_fidelity']['mean'], 3),
          {k: round(v, 2) for k, v in r['identity_attributes'].items()}, flush=True)
  with open(out, 'w') as f:
    json.dump(results, f, indent=1)
# The next round of the shipped model's stage, as `demo_train.continue_t2i` numbers it (keys, batches, EMA steps).
offset, index = config.t2i_steps + sum(r.steps for r in config.t2i_rounds), len(config.t2i_rounds) + 1
base_key = jax.random.key(config.seed + 4 + 1000 * index)
t = time.time()
params, ema, opt_state = state
for i in range(steps):
  params, ema, opt_state, loss = step(params, ema, opt_state, batches(offset + i), jax.random.fold_in(base_key, i), jnp.float32(offset + i))
  if i % 100 == 0:
    print('step', i, float(loss), round(time.time() - t), 's', flush=True)
  if (i + 1) % chunk == 0 or i + 1 == steps:
    score(f'+{i + 1}', ema)
    np.savez(out + '.state.npz', *jax.device_get(jax.tree.leaves((params, ema))))
