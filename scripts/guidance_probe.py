"""Issue 17 probe: the protocol's reference rows (described, coarse) on the shipped demo model at other
classifier-free guidance scales than the protocol's 4. A measurement, not a setting:
  python scripts/guidance_probe.py OUT.json 2,8 described[,coarse]"""
import json, sys
import e4t_jax
from e4t_jax.lab import evaluate as E, reproduce as R
model = e4t_jax.load_demo()
readout = E.ReadoutModel.load(e4t_jax.DEMO_MODEL_DIR / 'readout.safetensors')
cases = R.protocol(50, seed=0)
out = {}
for g in [float(x) for x in sys.argv[2].split(',')]:
  R.GUIDANCE_SCALE = g
  for kind in sys.argv[3].split(','):
    r = R.evaluate_method(model, readout, kind, 0, cases, progress=False)
    out[f'{kind}@{g}'] = {'identity': r['identity']['mean'], 'ci95': r['identity']['ci95'],
                          'prompt_fidelity': r['prompt_fidelity']['mean'], 'attributes': r['identity_attributes']}
    print(kind, g, round(r['identity']['mean'], 3), round(r['prompt_fidelity']['mean'], 3),
          {k: round(v, 2) for k, v in r['identity_attributes'].items()}, flush=True)
    json.dump(out, open(sys.argv[1], 'w'), indent=1)
