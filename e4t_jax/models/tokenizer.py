"""The CLIP byte-level BPE tokenizer, without torch, transformers or a model hub.

`CLIPTokenizer` reads the `tokenizer/` folder of a diffusers pipeline (vocab.json + merges.txt,
plus tokenizer_config.json / special_tokens_map.json when present), or the copy of the OpenAI
CLIP vocabulary that ships in this package (`CLIPTokenizer.default()`, see
`e4t_jax/assets/clip_tokenizer/NOTICE`). Its ids match Hugging Face's `CLIPTokenizer`, the one the
reference diffusers pipelines use:

  tokenizer = CLIPTokenizer.from_dir('stable-diffusion-v1-5/tokenizer')
  tokenizer, placeholder_id = tokenizer.with_placeholder('*')
  input_ids = tokenizer(['a photo of *'])              # int32 [1, 77]: bos, ..., eos, pad...
  tokenizer.placeholder_positions(input_ids, placeholder_id)   # [[4]]

Text clean-up. OpenAI CLIP runs `ftfy.fix_text`, unescapes HTML twice, collapses whitespace and
lowercases. ftfy is not a dependency here, so we do: HTML unescape (twice), Unicode NFC (which
ftfy also applies), whitespace collapse, lowercase. What ftfy would do beyond that (repair of
mojibake, curly quotes to straight ones, full-width to half-width letters, ligature splitting) is
not done. Hugging Face's tokenizer does neither ftfy nor HTML unescaping, so our ids differ from
its ids only for prompts that hold an HTML entity such as `&amp;` (we read it as `&`, as CLIP's
own tokenizer does), and for characters assigned after Unicode 14 (the `regex` module and
Hugging Face's regex engine know different Unicode versions; checked on every code point).

Special tokens. Like Hugging Face, each special token (bos, eos, unk, pad) is matched whole in
the raw text. Stable Diffusion 2's folder pads with `!`, so there a `!` in a prompt becomes the
pad id 0, not `!</w>` (256); we keep this because the reference pipeline tokenizes that way.

Placeholders. `with_placeholder(token)` returns a new tokenizer (tokenizers are never changed in
place) in which `token` is matched whole, case-sensitively, in the raw text before any clean-up or
BPE, and maps to a new id after the vocabulary (49408, 49409, ...). A placeholder may be a string
that is also a vocabulary entry, such as `*` (vocab.json id 9; as a word it is `*</w>`, 265): the
text encoder needs a new embedding row for it either way. transformers cannot load such a placeholder from a saved
folder (it maps it to the vocabulary id), so prefer a new string such as `<e4t>` when the folder
is to be read by transformers too.
"""
from __future__ import annotations

import copy
import functools
import html
import importlib.resources
import json
import os
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import regex

from e4t_jax.errors import InputError
from e4t_jax.fileio import read_json

VOCAB_FILE = 'vocab.json'
MERGES_FILE = 'merges.txt'
TOKENIZER_CONFIG_FILE = 'tokenizer_config.json'
SPECIAL_TOKENS_MAP_FILE = 'special_tokens_map.json'
ADDED_TOKENS_FILE = 'added_tokens.json'
TOKENIZER_JSON_FILE = 'tokenizer.json'

BOS_TOKEN = '<|startoftext|>'
EOS_TOKEN = '<|endoftext|>'
DEFAULT_MAX_LENGTH = 77  # The context of every CLIP text encoder Stable Diffusion uses.
END_OF_WORD = '</w>'
PADDING_MODES = ('max_length', 'longest')

# A `model_max_length` above this is Hugging Face's "unknown" marker (int(1e30)), not a length.
_LARGEST_PLAUSIBLE_MAX_LENGTH = 1_000_000
_BPE_CACHE_LIMIT = 100_000
_PACKAGED_ASSETS = ('assets', 'clip_tokenizer')

# OpenAI CLIP's word pattern (Hugging Face uses it too, without re.IGNORECASE). `\s` is spelled
# \p{White_Space} as in Hugging Face: Python's `\s` would also swallow the separators \x1c-\x1f.
_WORD_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\p{White_Space}\p{L}\p{N}]+""")
_WHITESPACE_RUN = regex.compile(r'\p{White_Space}+')


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """Maps each byte to the printable character that stands for it in the BPE vocabulary (GPT-2/CLIP)."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
               list(range(ord('®'), ord('ÿ') + 1)))
  byte_values = printable[:]
  char_codes = printable[:]
  extra = 0
  for byte in range(256):
    if byte not in byte_values:
      byte_values.append(byte)
      char_codes.append(256 + extra)
      extra += 1
  return dict(zip(byte_values, (chr(code) for code in char_codes)))


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
  return {char: byte for byte, char in bytes_to_unicode().items()}


def clean_text(text: str) -> str:
  """CLIP's text clean-up without ftfy: HTML unescape (twice), NFC, whitespace collapse, lowercase."""
  text = html.unescape(html.unescape(text))
  text = unicodedata.normalize('NFC', text)
  text = _WHITESPACE_RUN.sub(' ', text).strip(' ')
  # Character by character, as Hugging Face does: Python's lower() would turn a word-final 'Σ' into 'ς'.
  return text.replace('Σ', 'σ').lower()


class _BytePairEncoder:
  """The vocabulary, the merge ranks and a cache of encoded words; shared by tokenizer copies."""

  def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], unk_id: int):
    self.vocab = vocab
    self.merge_ranks = {merge: rank for rank, merge in enumerate(merges)}
    self.merges = merges
    self.unk_id = unk_id
    self.id_to_token = {token_id: token for token, token_id in vocab.items()}
    self._byte_chars = bytes_to_unicode()
    self._cache: dict[str, tuple[int, ...]] = {}

  def encode_word(self, word: str) -> tuple[int, ...]:
    """Ids of one pre-tokenized word (a match of the CLIP word pattern)."""
    cached = self._cache.get(word)
    if cached is not None:
      return cached
    symbols = ''.join(self._byte_chars[byte] for byte in word.encode('utf-8'))
    ids = tuple(self.vocab.get(piece, self.unk_id) for piece in self._merge(symbols))
    if len(self._cache) >= _BPE_CACHE_LIMIT:
      self._cache.clear()
    self._cache[word] = ids
    return ids

  def _merge(self, symbols: str) -> list[str]:
    """Applies the merges, lowest rank first, to the symbols of one word (OpenAI CLIP's `bpe`)."""
    parts = list(symbols[:-1]) + [symbols[-1] + END_OF_WORD]
    while len(parts) > 1:
      pairs = set(zip(parts, parts[1:]))
      best = min(pairs, key=lambda pair: self.merge_ranks.get(pair, float('inf')))
      if best not in self.merge_ranks:
        break
      first, second = best
      merged = []
      index = 0
      while index < len(parts):
        if index < len(parts) - 1 and parts[index] == first and parts[index + 1] == second:
          merged.append(first + second)
          index += 2
        else:
          merged.append(parts[index])
          index += 1
      parts = merged
    return parts


class CLIPTokenizer:
  """CLIP's byte-level BPE tokenizer with Hugging Face-compatible ids, padding and truncation.

  Instances are immutable: `with_placeholder` returns a new tokenizer. Build one with `from_dir`
  (a diffusers `tokenizer/` folder) or `default()` (the packaged OpenAI CLIP vocabulary).
  """

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN,
               pad_token: str = EOS_TOKEN, model_max_length: int = DEFAULT_MAX_LENGTH,
               placeholders: Iterable[str] = (), source: str = '<memory>'):
    """Builds a tokenizer from an in-memory vocabulary; prefer `from_dir` / `default`.

    Args:
      vocab: token -> id, ids 0..len(vocab)-1 each used once.
      merges: the BPE merges, highest priority first; each result must be in `vocab`.
      bos_token: added before the text (`<|startoftext|>`).
      eos_token: added after the text (`<|endoftext|>`).
      unk_token: id for a piece that is not in `vocab`.
      pad_token: fills the rows to `max_length` (SD1: `<|endoftext|>`, SD2: `!`).
      model_max_length: default `max_length` of `__call__` (77 for CLIP).
      placeholders: placeholder tokens, in id order, after the vocabulary.
      source: where the files came from, for error messages.

    Raises:
      InputError: the vocabulary, the merges or a special token is unusable.
    """
    self._source = source
    vocab = dict(vocab)
    merges = [tuple(merge) for merge in merges]
    _check_vocab(vocab, merges, source)
    special = {'bos_token': bos_token, 'eos_token': eos_token, 'unk_token': unk_token, 'pad_token': pad_token}
    for role, token in special.items():
      if token not in vocab:
        raise InputError(f'{source}: the {role} {token!r} is not in the vocabulary; fix the token in '
                         f'{TOKENIZER_CONFIG_FILE}/{SPECIAL_TOKENS_MAP_FILE} or use a CLIP tokenizer folder.')
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
      raise InputError(f'{source}: model_max_length must be an integer >= 2 (bos + eos), got {model_max_length!r}.')
    self._encoder = _BytePairEncoder(vocab, merges, unk_id=vocab[unk_token])
    self._special_tokens = special
    self._model_max_length = model_max_length
    self._placeholders: dict[str, int] = {}
    for token in placeholders:
      self._check_new_placeholder(token)
      self._placeholders = {**self._placeholders, token: len(vocab) + len(self._placeholders)}
    self._split_pattern = self._compile_split_pattern()

  # --------------------------------------------------------------------------- construction
  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> CLIPTokenizer:
    """Reads a tokenizer folder as diffusers pipelines have it.

    Args:
      path: the `tokenizer/` folder, or a pipeline folder that has one. It holds vocab.json and
        merges.txt (optionally tokenizer_config.json, special_tokens_map.json, added_tokens.json),
        or, as transformers 5 saves it, tokenizer.json (+ tokenizer_config.json).

    Returns:
      The tokenizer, with the folder's special tokens, model_max_length and added tokens beyond
      the vocabulary (as `save` writes placeholders) as placeholders.

    Raises:
      InputError: the folder or a file is missing or malformed; the message names it and the fix.
    """
    folder = Path(path)
    if not folder.is_dir():
      raise InputError(f'tokenizer folder {folder} does not exist; pass the `tokenizer/` folder of a '
                       f'diffusers pipeline (it holds {VOCAB_FILE} and {MERGES_FILE}).')
    if not _has_vocabulary(folder) and _has_vocabulary(folder / 'tokenizer'):
      folder = folder / 'tokenizer'
    added_tokens: dict[int, str] = {}
    if (folder / VOCAB_FILE).is_file() or not (folder / TOKENIZER_JSON_FILE).is_file():
      vocab = _read_vocab(folder / VOCAB_FILE)
      merges = _read_merges(folder / MERGES_FILE)
    else:
      vocab, merges, added_tokens = _read_tokenizer_json(folder / TOKENIZER_JSON_FILE)
    config = _read_json_object(folder / TOKENIZER_CONFIG_FILE, required=False)
    special_map = _read_json_object(folder / SPECIAL_TOKENS_MAP_FILE, required=False)

    special = {'bos_token': BOS_TOKEN, 'eos_token': EOS_TOKEN, 'unk_token': EOS_TOKEN, 'pad_token': EOS_TOKEN}
    for settings, file_name in ((config, TOKENIZER_CONFIG_FILE), (special_map, SPECIAL_TOKENS_MAP_FILE)):
      for role in special:
        if settings.get(role) is not None:
          special[role] = _token_content(settings[role], folder / file_name, role)

    model_max_length = config.get('model_max_length', DEFAULT_MAX_LENGTH)
    if isinstance(model_max_length, (int, float)) and model_max_length > _LARGEST_PLAUSIBLE_MAX_LENGTH:
      model_max_length = DEFAULT_MAX_LENGTH  # Hugging Face's "no limit" marker, int(1e30).
    if isinstance(model_max_length, float) and model_max_length.is_integer():
      model_max_length = int(model_max_length)
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
      raise InputError(f'{folder / TOKENIZER_CONFIG_FILE}: model_max_length must be an integer >= 2, got '
                       f'{model_max_length!r}; fix it (CLIP uses 77).')

    added_tokens.update(_read_added_tokens(folder, config))
    placeholders = _placeholders_beyond_vocab(added_tokens, folder, vocab_size=len(vocab),
                                              special_tokens=set(special.values()))
    return cls(vocab, merges, **special, model_max_length=model_max_length,
               placeholders=placeholders, source=str(folder))

  @classmethod
  def default(cls) -> CLIPTokenizer:
    """The OpenAI CLIP tokenizer shipped in this package (Stable Diffusion 1.x settings: pads with eos)."""
    resource = importlib.resources.files('e4t_jax').joinpath(*_PACKAGED_ASSETS)
    with importlib.resources.as_file(resource) as folder:
      return cls.from_dir(folder)

  def with_placeholder(self, token: str) -> tuple[CLIPTokenizer, int]:
    """Returns (a new tokenizer that also knows `token`, the id of `token`); `self` is unchanged.

    The placeholder is matched whole and case-sensitively in the raw text (before clean-up and
    BPE), so `'a photo of *'` and `'a photo of*'` both give one placeholder id. Its id follows the
    vocabulary and the placeholders added before it: 49408, 49409, ...

    Raises:
      InputError: `token` is empty, holds whitespace, or is a special token or placeholder already.
    """
    self._check_new_placeholder(token)
    new = copy.copy(self)
    new._placeholders = {**self._placeholders, token: self.vocab_size}
    new._split_pattern = new._compile_split_pattern()
    return new, new._placeholders[token]

  def with_max_length(self, max_length: int) -> CLIPTokenizer:
    """A new tokenizer padding/truncating to `max_length` by default (a text encoder with fewer
    position embeddings than CLIP's 77, e.g. the embedded demo model); `self` is unchanged."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
      raise InputError(f'max_length must be an integer >= 2 (bos + eos), got {max_length!r}.')
    new = copy.copy(self)
    new._model_max_length = max_length
    return new

  def with_pad_token(self, token: str) -> CLIPTokenizer:
    """A new tokenizer padding with `token` (SD 2.x / SDXL's second tokenizer: `!`); `self` is unchanged.

    Raises:
      InputError: `token` is not in the vocabulary.
    """
    if token not in self._encoder.vocab:
      raise InputError(f'pad token {token!r} is not in the vocabulary of {self._source}.')
    new = copy.copy(self)
    new._special_tokens = {**self._special_tokens, 'pad_token': token}
    new._split_pattern = new._compile_split_pattern()
    return new

  def save(self, path: str | os.PathLike) -> Path:
    """Writes the tokenizer as a folder that `from_dir` and transformers' `CLIPTokenizer` both load.

    Writes vocab.json, merges.txt, tokenizer_config.json (model_max_length, special tokens and the
    placeholders as `added_tokens_decoder` entries) and special_tokens_map.json. transformers gives
    a placeholder whose string is also in vocab.json (such as `*`) the vocabulary id instead; only
    `from_dir` restores those (see the module docstring).

    Returns:
      The folder.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _write_text(folder / VOCAB_FILE, json.dumps(self._encoder.vocab, ensure_ascii=False, separators=(',', ':')) + '\n')
    _write_text(folder / MERGES_FILE,
                '#version: 0.2\n' + ''.join(f'{left} {right}\n' for left, right in self._encoder.merges))
    added_tokens = {}
    for token in dict.fromkeys(self._special_tokens.values()):
      added_tokens[str(self._encoder.vocab[token])] = _added_token_entry(token, special=True)
    for token, token_id in self._placeholders.items():
      added_tokens[str(token_id)] = _added_token_entry(token, special=False)
    config = {
        'tokenizer_class': 'CLIPTokenizer',
        'model_max_length': self._model_max_length,
        **self._special_tokens,
        'added_tokens_decoder': added_tokens,
    }
    _write_text(folder / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + '\n')
    _write_text(folder / SPECIAL_TOKENS_MAP_FILE, json.dumps(self._special_tokens, indent=2, ensure_ascii=False) + '\n')
    return folder

  # --------------------------------------------------------------------------- properties
  @property
  def vocab_size(self) -> int:
    """Number of ids: the vocabulary plus the placeholders (the text encoder's embedding rows)."""
    return len(self._encoder.vocab) + len(self._placeholders)

  def in_vocabulary(self, token: str) -> bool:
    """Whether `token` is a key of the BPE vocabulary (vocab.json; what transformers' `get_vocab()`
    holds besides added tokens)."""
    return token in self._encoder.vocab

  @property
  def model_max_length(self) -> int:
    return self._model_max_length

  @property
  def bos_id(self) -> int:
    return self._encoder.vocab[self._special_tokens['bos_token']]

  @property
  def eos_id(self) -> int:
    return self._encoder.vocab[self._special_tokens['eos_token']]

  @property
  def pad_id(self) -> int:
    return self._encoder.vocab[self._special_tokens['pad_token']]

  @property
  def special_tokens(self) -> dict[str, str]:
    """Role ('bos_token', 'eos_token', 'unk_token', 'pad_token') -> token."""
    return dict(self._special_tokens)

  @property
  def placeholders(self) -> dict[str, int]:
    """Placeholder token -> id, in the order they were added."""
    return dict(self._placeholders)

  # --------------------------------------------------------------------------- encoding
  def encode(self, text: str) -> list[int]:
    """Ids of `text` without bos/eos, padding or truncation."""
    if not isinstance(text, str):
      raise InputError(f'a prompt must be a string, got {type(text).__name__}.')
    ids: list[int] = []
    for index, segment in enumerate(self._split_pattern.split(text)):
      if index % 2:  # A captured special token or placeholder.
        ids.append(self._placeholders.get(segment, self._encoder.vocab.get(segment)))
      elif segment:
        for word in _WORD_PATTERN.findall(clean_text(segment)):
          ids.extend(self._encoder.encode_word(word))
    return ids

  def is_truncated(self, text: str, max_length: int | None = None) -> bool:
    """Whether `text` with bos and eos is longer than `max_length` (default model_max_length)."""
    max_length = self._model_max_length if max_length is None else max_length
    return len(self.encode(text)) + 2 > max_length

  def __call__(self, texts: str | Sequence[str], max_length: int | None = None,
               padding: str = 'max_length', truncation: bool = True) -> np.ndarray:
    """Tokenizes a batch like Hugging Face: `[bos, ids..., eos, pad...]`.

    Args:
      texts: the prompts (a single string is a batch of one).
      max_length: row length; defaults to model_max_length (77).
      padding: 'max_length' pads every row to `max_length`; 'longest' to the longest row.
      truncation: cut a long prompt to `max_length - 2` ids, then add eos (check `is_truncated`
        to warn the user); with False a prompt that does not fit raises InputError.

    Returns:
      int32 array [len(texts), length].
    """
    if isinstance(texts, str):
      texts = [texts]
    max_length = self._model_max_length if max_length is None else max_length
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
      raise InputError(f'max_length must be an integer >= 2 (room for bos and eos), got {max_length!r}.')
    if padding not in PADDING_MODES:
      raise InputError(f'padding must be one of {PADDING_MODES}, got {padding!r}.')
    rows = []
    for text in texts:
      ids = self.encode(text)
      if len(ids) + 2 > max_length:
        if not truncation:
          raise InputError(f'prompt {text[:60]!r} is {len(ids) + 2} tokens, longer than max_length '
                           f'{max_length}; shorten it or tokenize with truncation=True.')
        ids = ids[:max_length - 2]
      rows.append([self.bos_id, *ids, self.eos_id])
    length = max_length if padding == 'max_length' else max((len(row) for row in rows), default=2)
    batch = np.full((len(rows), length), self.pad_id, dtype=np.int32)
    for row_index, row in enumerate(rows):
      batch[row_index, :len(row)] = row
    return batch

  def placeholder_positions(self, ids: Sequence[int] | np.ndarray, placeholder_id: int) -> list:
    """Where `placeholder_id` occurs: a list of positions for 1-D ids, a list of lists for 2-D.

    Raises:
      InputError: `placeholder_id` is not one of this tokenizer's placeholders, or `ids` is not 1-D/2-D.
    """
    if placeholder_id not in self._placeholders.values():
      raise InputError(f'id {placeholder_id} is not a placeholder of this tokenizer (placeholders: '
                       f'{self._placeholders}); add it with with_placeholder().')
    array = np.asarray(ids)
    if array.ndim == 1:
      return np.flatnonzero(array == placeholder_id).tolist()
    if array.ndim == 2:
      return [np.flatnonzero(row == placeholder_id).tolist() for row in array]
    raise InputError(f'ids must be 1-D or 2-D, got shape {array.shape}.')

  # --------------------------------------------------------------------------- decoding
  def id_to_token(self, token_id: int) -> str:
    """The vocabulary string of an id (byte-level characters, '</w>' ending a word)."""
    token_id = int(token_id)
    for token, placeholder_id in self._placeholders.items():
      if placeholder_id == token_id:
        return token
    token = self._encoder.id_to_token.get(token_id)
    if token is None:
      raise InputError(f'id {token_id} is outside the vocabulary (size {self.vocab_size}).')
    return token

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
    """Text of `ids`, words separated by one space (like Hugging Face's decode).

    Args:
      ids: 1-D ids, e.g. one row of `__call__`.
      skip_special_tokens: drop bos, eos, unk and pad (default), as needed for padded rows.
    """
    special_ids = {self._encoder.vocab[token] for token in self._special_tokens.values()}
    placeholder_ids = set(self._placeholders.values())
    byte_decoder = _unicode_to_bytes()
    pieces: list[str] = []
    pending_bytes = bytearray()

    def flush() -> None:
      if pending_bytes:
        pieces.append(pending_bytes.decode('utf-8', errors='replace'))
        pending_bytes.clear()

    for token_id in np.asarray(ids).reshape(-1).tolist():
      if token_id in special_ids and skip_special_tokens:
        continue
      token = self.id_to_token(token_id)
      if token_id in placeholder_ids:
        flush()
        pieces.append(token + ' ')
      elif token_id in special_ids:
        flush()
        pieces.append(token)
      else:
        word_end = token.endswith(END_OF_WORD)
        pending_bytes.extend(byte_decoder[char] for char in (token[:-len(END_OF_WORD)] if word_end else token))
        if word_end:
          pending_bytes.extend(b' ')
    flush()
    return ''.join(pieces).strip()

  # --------------------------------------------------------------------------- internals
  def _check_new_placeholder(self, token: Any) -> None:
    if not isinstance(token, str) or not token:
      raise InputError(f'a placeholder must be a non-empty string, got {token!r}; use e.g. "*" or "<e4t>".')
    if any(char.isspace() for char in token):
      raise InputError(f'placeholder {token!r} holds whitespace; use one word such as "*" or "<e4t>".')
    if token in self._special_tokens.values():
      raise InputError(f'placeholder {token!r} collides with the special token of the same name; '
                       f'pick another string such as "*" or "<e4t>".')
    if token in self._placeholders:
      raise InputError(f'placeholder {token!r} is already present (id {self._placeholders[token]}); '
                       f'look it up in tokenizer.placeholders instead of adding it again.')

  def _compile_split_pattern(self) -> regex.Pattern:
    """A pattern whose single group captures each special token or placeholder, longest first."""
    whole_tokens = set(self._special_tokens.values()) | set(self._placeholders)
    alternatives = '|'.join(regex.escape(token) for token in sorted(whole_tokens, key=lambda t: (-len(t), t)))
    return regex.compile(f'({alternatives})')

  def __repr__(self) -> str:
    return (f'CLIPTokenizer(source={self._source!r}, vocab_size={self.vocab_size}, '
            f'model_max_length={self._model_max_length}, pad_token={self._special_tokens["pad_token"]!r}, '
            f'placeholders={self._placeholders})')


# ----------------------------------------------------------------------------- file reading
def _read_json_object(path: Path, *, required: bool) -> dict[str, Any]:
  if not path.is_file():
    if required:
      raise InputError(f'{path} is missing; a CLIP tokenizer folder needs {VOCAB_FILE} and {MERGES_FILE} '
                       f'(copy the `tokenizer/` folder of the diffusers pipeline).')
    return {}
  return read_json(path, what='a CLIP tokenizer folder', error=InputError)


def _read_vocab(path: Path) -> dict[str, int]:
  vocab = _read_json_object(path, required=True)
  if not vocab:
    raise InputError(f'{path} is empty; restore it from the original pipeline.')
  for token, token_id in vocab.items():
    if isinstance(token_id, bool) or not isinstance(token_id, int):
      raise InputError(f'{path}: token {token!r} has id {token_id!r}, not an integer; the file must map '
                       f'token -> id (restore it from the original pipeline).')
  return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
  if not path.is_file():
    raise InputError(f'{path} is missing; a CLIP tokenizer folder needs {VOCAB_FILE} and {MERGES_FILE} '
                     f'(copy the `tokenizer/` folder of the diffusers pipeline).')
  try:
    lines = path.read_text(encoding='utf-8').split('\n')
  except (OSError, UnicodeDecodeError) as error:
    raise InputError(f'{path} is not a readable UTF-8 text file ({error}); restore it.') from error
  merges = []
  for line_number, line in enumerate(lines, start=1):
    if (line_number == 1 and line.startswith('#version')) or not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise InputError(f'{path}, line {line_number}: expected a "left right" merge pair, got {line[:80]!r}; '
                       f'restore the file from the original pipeline.')
    merges.append((parts[0], parts[1]))
  return merges


def _check_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], source: str) -> None:
  """The vocabulary must be ids 0..n-1 once each and contain every byte and every merge result."""
  ids = sorted(vocab.values())
  if ids != list(range(len(vocab))):
    duplicates = len(ids) - len(set(ids))
    raise InputError(f'{source}: {VOCAB_FILE} ids must be 0..{len(vocab) - 1}, each used once '
                     f'({duplicates} repeated, range {ids[0]}..{ids[-1]}); restore the file.')
  missing = [char for char in bytes_to_unicode().values() if char not in vocab or char + END_OF_WORD not in vocab]
  if missing:
    raise InputError(f'{source}: {VOCAB_FILE} lacks byte tokens such as {missing[0]!r}; it is not a CLIP '
                     f'byte-level BPE vocabulary.')
  for rank, (left, right) in enumerate(merges):
    if left + right not in vocab:
      raise InputError(f'{source}: merge {rank + 1} ({left!r} {right!r}) of {MERGES_FILE} gives '
                       f'{left + right!r}, which is not in {VOCAB_FILE}; the two files do not belong together.')


def _token_content(value: Any, path: Path, role: str) -> str:
  """A special token given as a string or as Hugging Face's AddedToken dict {'content': ...}."""
  if isinstance(value, dict):
    value = value.get('content')
  if not isinstance(value, str) or not value:
    raise InputError(f'{path}: {role} must be a token string or {{"content": ...}}, got {value!r}; fix it.')
  return value


def _has_vocabulary(folder: Path) -> bool:
  return (folder / VOCAB_FILE).is_file() or (folder / TOKENIZER_JSON_FILE).is_file()


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[int, str]]:
  """(vocab, merges, added tokens by id) from a `tokenizers` tokenizer.json of a CLIP BPE model."""
  data = _read_json_object(path, required=True)
  model = data.get('model')
  if not isinstance(model, dict) or model.get('type') != 'BPE' or model.get('end_of_word_suffix') != END_OF_WORD:
    raise InputError(f'{path} does not describe a CLIP byte-level BPE model (model.type "BPE" with '
                     f'end_of_word_suffix "{END_OF_WORD}"); use the text encoder\'s own tokenizer folder.')
  vocab = model.get('vocab')
  raw_merges = model.get('merges')
  if not isinstance(vocab, dict) or not isinstance(raw_merges, list):
    raise InputError(f'{path}: model.vocab must be an object and model.merges a list; restore the file.')
  for token, token_id in vocab.items():
    if isinstance(token_id, bool) or not isinstance(token_id, int):
      raise InputError(f'{path}: token {token!r} has id {token_id!r}, not an integer; restore the file.')
  merges = []
  for rank, merge in enumerate(raw_merges):
    parts = merge.split() if isinstance(merge, str) else merge
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(part, str) for part in parts):
      raise InputError(f'{path}: merge {rank + 1} is {merge!r}, not a "left right" pair; restore the file.')
    merges.append((parts[0], parts[1]))
  added: dict[int, str] = {}
  for entry in data.get('added_tokens') or []:
    if not isinstance(entry, dict) or isinstance(entry.get('id'), bool) or not isinstance(entry.get('id'), int):
      raise InputError(f'{path}: added token {entry!r} needs an integer "id" and a "content"; restore the file.')
    added[entry['id']] = _token_content(entry, path, f'added token {entry["id"]}')
  return vocab, merges, added


def _read_added_tokens(folder: Path, config: Mapping[str, Any]) -> dict[int, str]:
  """Added tokens by id, from tokenizer_config.json's added_tokens_decoder and added_tokens.json."""
  added: dict[int, str] = {}
  decoder = config.get('added_tokens_decoder') or {}
  if not isinstance(decoder, dict):
    raise InputError(f'{folder / TOKENIZER_CONFIG_FILE}: added_tokens_decoder must be an object; fix it.')
  for token_id, entry in decoder.items():
    try:
      added[int(token_id)] = _token_content(entry, folder / TOKENIZER_CONFIG_FILE, f'added token {token_id}')
    except ValueError as error:
      raise InputError(f'{folder / TOKENIZER_CONFIG_FILE}: added token id {token_id!r} is not an integer.') from error
  for token, token_id in _read_json_object(folder / ADDED_TOKENS_FILE, required=False).items():
    if isinstance(token_id, bool) or not isinstance(token_id, int):
      raise InputError(f'{folder / ADDED_TOKENS_FILE}: token {token!r} has id {token_id!r}, not an integer.')
    added[token_id] = token
  return added


def _placeholders_beyond_vocab(added: Mapping[int, str], folder: Path, *, vocab_size: int,
                               special_tokens: set[str]) -> list[str]:
  """The added tokens with ids after the vocabulary, in id order; the ids must have no gaps."""
  beyond_vocab = {token_id: token for token_id, token in added.items()
                  if token_id >= vocab_size and token not in special_tokens}
  expected_ids = list(range(vocab_size, vocab_size + len(beyond_vocab)))
  if sorted(beyond_vocab) != expected_ids:
    raise InputError(f'{folder}: added token ids {sorted(beyond_vocab)} must follow the vocabulary '
                     f'without gaps ({expected_ids}); fix {TOKENIZER_CONFIG_FILE}/{ADDED_TOKENS_FILE}.')
  return [beyond_vocab[token_id] for token_id in expected_ids]


def _added_token_entry(token: str, *, special: bool) -> dict[str, Any]:
  return {'content': token, 'lstrip': False, 'normalized': False, 'rstrip': False,
          'single_word': False, 'special': special}


def _write_text(path: Path, text: str) -> None:
  path.write_text(text, encoding='utf-8', newline='\n')
