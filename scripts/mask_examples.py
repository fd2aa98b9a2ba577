"""Writes docs/results/paper-mode/masks.png: held-out synthetic faces (the eval protocol's inputs) and the
loss masks `synthetic.render(with_mask=True)` ships with them (white = face; the accessory is context).

  python scripts/mask_examples.py [OUT.png]
"""
import sys

import numpy as np

from e4t_jax import generation
from e4t_jax.data import synthetic
from e4t_jax.data.images import encode_png
from e4t_jax.fileio import atomic_write_bytes


def main(out: str = 'docs/results/paper-mode/masks.png') -> None:
  tiles, labels = [], []
  for i, identity in enumerate(synthetic.heldout_identities(4, seed=0)):
    context = synthetic.Context(background=i, accessory=i % 4, size=i % 2)
    image, mask = synthetic.render(identity, context, with_mask=True)
    grey = np.repeat(np.round(mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
    tiles += [image, grey]
    labels += [synthetic.CONTEXT_ATTRIBUTES['accessory'][context.accessory], f'mask {mask.mean():.0%}']
  grid = generation.make_grid(np.stack([np.kron(t, np.ones((2, 2, 1), np.uint8)) for t in tiles]), labels,
                              columns=4)
  atomic_write_bytes(out, [encode_png(grid)])
  print(out)


if __name__ == '__main__':
  main(*sys.argv[1:])
