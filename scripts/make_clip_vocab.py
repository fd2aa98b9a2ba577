"""Builds the packaged CLIP tokenizer files from the BPE list that ships in the open_clip wheel.

The CLIP byte-level BPE list (`bpe_simple_vocab_16e6.txt.gz`, MIT licensed, OpenAI) is inside the
`open-clip-torch` wheel on PyPI. Fetch the wheel once (it is not installed, only read as a zip):

  pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
  python scripts/make_clip_vocab.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The script writes, into `e4t_jax/assets/clip_tokenizer/` (or `--out`), the layout that Hugging Face
and diffusers `tokenizer/` folders use:

  vocab.json               49408 entries, built exactly like OpenAI CLIP's `SimpleTokenizer`:
                           256 byte-chars, the same with '</w>', the result of each of the 48894
                           merges, then '<|startoftext|>' (49406) and '<|endoftext|>' (49407).
  merges.txt               '#version: 0.2' then the 48894 merges, one 'left right' pair a line.
  tokenizer_config.json    model_max_length 77 and the special tokens (Stable Diffusion 1.x style:
  special_tokens_map.json  pads with '<|endoftext|>').
  NOTICE                   license and provenance (wheel, version, sha256 of the .gz).

Only the standard library is used; the output is deterministic.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from e4t_jax.models.tokenizer import bytes_to_unicode  # noqa: E402  (the one byte table, shared with the tokenizer)

BPE_MEMBER = 'open_clip/bpe_simple_vocab_16e6.txt.gz'
LICENSE_MEMBER_SUFFIX = '.dist-info/licenses/LICENSE'
# OpenAI CLIP keeps lines[1 : 49152 - 256 - 2 + 1] of the file: 48894 merges.
MERGE_COUNT = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS_TOKEN = '<|startoftext|>'
EOS_TOKEN = '<|endoftext|>'
MODEL_MAX_LENGTH = 77
DEFAULT_OUT = Path(__file__).resolve().parent.parent / 'e4t_jax' / 'assets' / 'clip_tokenizer'


def build_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Returns (vocab, merges) exactly as OpenAI CLIP's SimpleTokenizer builds them."""
  lines = bpe_text.split('\n')
  merges = [tuple(line.split()) for line in lines[1:MERGE_COUNT + 1]]
  for number, merge in enumerate(merges, start=2):
    if len(merge) != 2:
      raise SystemExit(f'line {number} of the BPE file is not a "left right" pair: {merge!r}')
  byte_chars = list(bytes_to_unicode().values())
  tokens = byte_chars + [char + '</w>' for char in byte_chars]
  tokens += [left + right for left, right in merges]
  tokens += [BOS_TOKEN, EOS_TOKEN]
  vocab = {token: index for index, token in enumerate(tokens)}
  if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
    raise SystemExit(f'expected {VOCAB_SIZE} unique tokens, got {len(vocab)} of {len(tokens)}')
  return vocab, merges


def read_wheel(wheel_path: Path) -> tuple[bytes, str]:
  """Returns (the BPE .gz bytes, the wheel's LICENSE text)."""
  with zipfile.ZipFile(wheel_path) as wheel:
    names = wheel.namelist()
    if BPE_MEMBER not in names:
      raise SystemExit(f'{wheel_path} has no {BPE_MEMBER}; is it an open-clip-torch wheel?')
    license_names = [name for name in names if name.endswith(LICENSE_MEMBER_SUFFIX)]
    license_text = wheel.read(license_names[0]).decode('utf-8') if license_names else ''
    return wheel.read(BPE_MEMBER), license_text


def wheel_version(wheel_path: Path) -> str:
  match = re.match(r'open_clip_torch-([^-]+)-', wheel_path.name)
  return match.group(1) if match else 'unknown'


def notice_text(wheel_path: Path, gz_sha256: str, wheel_sha256: str, license_text: str) -> str:
  return f"""CLIP BPE tokenizer vocabulary (vocab.json, merges.txt)
=====================================================

These files are derived from the byte-pair-encoding list `bpe_simple_vocab_16e6.txt.gz` of
OpenAI CLIP (https://github.com/openai/CLIP), as redistributed in the open_clip package
(https://github.com/mlfoundations/open_clip): the same merges and tokens, rearranged into the
vocab.json/merges.txt layout.

Source:  {wheel_path.name} (PyPI package open-clip-torch=={wheel_version(wheel_path)})
         wheel sha256:                          {wheel_sha256}
         {BPE_MEMBER} sha256: {gz_sha256}
Built by scripts/make_clip_vocab.py: vocab.json follows OpenAI CLIP's SimpleTokenizer
construction (merges = lines[1:49152-256-2+1]); merges.txt holds the same {MERGE_COUNT} merges
under a '#version: 0.2' header, the layout of Hugging Face CLIP tokenizer folders.

Both OpenAI CLIP and open_clip are released under the MIT License:

-------------------------------------------------------------------------------
OpenAI CLIP

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.

-------------------------------------------------------------------------------
open_clip (LICENSE file of the wheel above)

{license_text.strip()}
"""


def write_text(path: Path, text: str) -> None:
  path.write_text(text, encoding='utf-8', newline='\n')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('wheel', type=Path, help='path to open_clip_torch-<version>-py3-none-any.whl')
  parser.add_argument('--out', type=Path, default=DEFAULT_OUT, help=f'output folder (default {DEFAULT_OUT})')
  args = parser.parse_args(argv)

  gz_bytes, license_text = read_wheel(args.wheel)
  bpe_text = gzip.decompress(gz_bytes).decode('utf-8')
  vocab, merges = build_vocab_and_merges(bpe_text)

  args.out.mkdir(parents=True, exist_ok=True)
  write_text(args.out / 'vocab.json', json.dumps(vocab, ensure_ascii=False, separators=(',', ':')) + '\n')
  write_text(args.out / 'merges.txt', '#version: 0.2\n' + ''.join(f'{left} {right}\n' for left, right in merges))
  special_tokens = {'bos_token': BOS_TOKEN, 'eos_token': EOS_TOKEN, 'unk_token': EOS_TOKEN, 'pad_token': EOS_TOKEN}
  write_text(args.out / 'special_tokens_map.json', json.dumps(special_tokens, indent=2) + '\n')
  config = {'tokenizer_class': 'CLIPTokenizer', 'model_max_length': MODEL_MAX_LENGTH, **special_tokens}
  write_text(args.out / 'tokenizer_config.json', json.dumps(config, indent=2) + '\n')
  write_text(args.out / 'NOTICE', notice_text(args.wheel, hashlib.sha256(gz_bytes).hexdigest(),
                                              hashlib.sha256(args.wheel.read_bytes()).hexdigest(), license_text))
  print(f'wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
