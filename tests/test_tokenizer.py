"""Tests of the torch-free CLIP tokenizer: packaged vocabulary, parity with transformers, placeholders, errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from e4t_jax.errors import InputError
from e4t_jax.models.tokenizer import CLIPTokenizer

ASSETS = Path(__file__).resolve().parent.parent / 'e4t_jax' / 'assets' / 'clip_tokenizer'
A_PHOTO_OF_A_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # The well-known OpenAI CLIP ids.
LONG_PROMPT = ', '.join(['a highly detailed oil painting of a majestic lion in the savanna at golden hour'] * 8)

PROMPTS = [
    'a photo of a cat',
    'A Photo Of A CAT',
    '  a   photo\tof\na    cat  ',
    '',
    '   ',
    'sks dog',
    'a photo of sks dog in the snow, 4k, trending on artstation',
    "don't stop, it's what we're doing; they'll say I'd've",
    "DON'T SHOUT!!! What's UP???",
    'rock\'n\'roll isn\'t dead',
    'the year 2024, 3.14159 and 1,000,000 dollars',
    'model-v2.1_final (copy) [draft] {x: 1}',
    'email me@example.com or visit https://example.com/a?b=c&d=e#f',
    '#hashtag @mention $100 50% a+b=c a*b a/b a\\b a|b ~tilde `code`',
    'café naïve résumé Über straße',
    'e\u0301cole',  # 'école' with a combining accent: NFC folds it.
    'ΣΊΣΥΦΟΣ and Ελληνικά',
    'Москва зимой',
    '東京の夜景, 高精細',
    '한국어 텍스트',
    'مرحبا بالعالم',
    'नमस्ते दुनिया',
    'emoji 🐱🐶 and flags 🇫🇷 and 👩\u200d💻',
    'ｆｕｌｌｗｉｄｔｈ ＡＢＣ',
    '\u201ccurly quotes\u201d and \u2018single\u2019 \u2014 em dash \u2026',
    'tabs\tand\u00a0non-breaking\u2003spaces\u3000ideographic',
    'control\x1cchars\x07here',
    '<|startoftext|>special tokens in text<|endoftext|>',
    'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',
    'supercalifragilisticexpialidocious antidisestablishmentarianism',
    LONG_PROMPT,
    ' '.join(str(number) for number in range(100)),
]


@pytest.fixture(scope='module')
def tokenizer():
  return CLIPTokenizer.default()


@pytest.fixture(scope='module')
def hf_tokenizer():
  transformers = pytest.importorskip('transformers')
  vocab = json.loads((ASSETS / 'vocab.json').read_text(encoding='utf-8'))
  merge_lines = (ASSETS / 'merges.txt').read_text(encoding='utf-8').split('\n')[1:]
  merges = [tuple(line.split()) for line in merge_lines if line]
  # transformers 5 ignores `vocab_file=`/`merges_file=`; pass the vocabulary itself.
  hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
  assert hf('a photo of a cat').input_ids == A_PHOTO_OF_A_CAT, 'transformers did not use our vocabulary'
  return hf


def hf_batch(hf, texts, **kwargs):
  return np.asarray(hf(texts, return_tensors='np', **kwargs)['input_ids'])


def copy_assets(destination: Path) -> Path:
  destination.mkdir(parents=True, exist_ok=True)
  for name in ('vocab.json', 'merges.txt'):
    shutil.copy(ASSETS / name, destination / name)
  return destination


def write_sd2_folder(destination: Path) -> Path:
  """A tokenizer folder as Stable Diffusion 2 ships it: pads with '!' (id 0)."""
  copy_assets(destination)
  entry = lambda content: {'__type': 'AddedToken', 'content': content, 'lstrip': False, 'normalized': True,
                           'rstrip': False, 'single_word': False}
  config = {'bos_token': entry('<|startoftext|>'), 'eos_token': entry('<|endoftext|>'), 'pad_token': '!',
            'unk_token': entry('<|endoftext|>'), 'model_max_length': 77, 'do_lower_case': True,
            'tokenizer_class': 'CLIPTokenizer'}
  (destination / 'tokenizer_config.json').write_text(json.dumps(config))
  special = {key: config[key] for key in ('bos_token', 'eos_token', 'pad_token', 'unk_token')}
  (destination / 'special_tokens_map.json').write_text(json.dumps(special))
  return destination


# ----------------------------------------------------------------------------- packaged vocabulary
def test_packaged_files_have_the_openai_clip_layout():
  vocab = json.loads((ASSETS / 'vocab.json').read_text(encoding='utf-8'))
  merges = (ASSETS / 'merges.txt').read_text(encoding='utf-8').splitlines()
  assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
  assert merges[0] == '#version: 0.2' and len(merges) == 1 + 48894
  assert vocab['!'] == 0 and vocab['!</w>'] == 256
  assert vocab[''.join(merges[1].split())] == 512  # First merge result follows the 512 byte tokens.
  assert vocab['<|startoftext|>'] == 49406 and vocab['<|endoftext|>'] == 49407
  notice = (ASSETS / 'NOTICE').read_text(encoding='utf-8')
  assert 'MIT License' in notice and 'OpenAI' in notice and 'open-clip-torch==3.3.0' in notice
  assert '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a' in notice


def test_default_tokenizer_gives_the_known_clip_ids(tokenizer):
  assert tokenizer.vocab_size == 49408 and tokenizer.model_max_length == 77
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (49406, 49407, 49407)
  batch = tokenizer(['a photo of a cat'])
  assert batch.dtype == np.int32 and batch.shape == (1, 77)
  assert batch[0, :7].tolist() == A_PHOTO_OF_A_CAT and (batch[0, 7:] == 49407).all()
  assert tokenizer.decode(batch[0]) == 'a photo of a cat'


def test_runtime_module_imports_neither_torch_nor_transformers():
  code = ('import sys, e4t_jax.models.tokenizer as t; t.CLIPTokenizer.default().encode("x"); '
          'bad = {"torch", "transformers", "tokenizers"} & set(sys.modules); assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ASSETS.parent.parent.parent)


# ----------------------------------------------------------------------------- parity with transformers
def test_ids_and_padding_match_transformers(tokenizer, hf_tokenizer):
  ours = tokenizer(PROMPTS, max_length=77, padding='max_length', truncation=True)
  theirs = hf_batch(hf_tokenizer, PROMPTS, max_length=77, padding='max_length', truncation=True)
  for prompt, our_row, their_row in zip(PROMPTS, ours, theirs):
    assert our_row.tolist() == their_row.tolist(), prompt
  longest_ours = tokenizer(PROMPTS[:12], max_length=77, padding='longest')
  longest_theirs = hf_batch(hf_tokenizer, PROMPTS[:12], max_length=77, padding='longest', truncation=True)
  np.testing.assert_array_equal(longest_ours, longest_theirs)


def test_untruncated_ids_and_decode_match_transformers(tokenizer, hf_tokenizer):
  for prompt in PROMPTS:
    ids = tokenizer.encode(prompt)
    assert ids == hf_tokenizer(prompt, add_special_tokens=False).input_ids, prompt
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), prompt


def test_sd2_folder_pads_with_its_own_pad_token(tmp_path, hf_tokenizer):
  transformers = pytest.importorskip('transformers')
  folder = write_sd2_folder(tmp_path / 'tokenizer')
  ours = CLIPTokenizer.from_dir(folder)
  hf = transformers.CLIPTokenizer.from_pretrained(folder)
  assert ours.pad_id == hf.pad_token_id == 0
  prompts = ['a photo of a cat', 'hello! wow!!', LONG_PROMPT]
  np.testing.assert_array_equal(ours(prompts), hf_batch(hf, prompts, max_length=77, padding='max_length',
                                                        truncation=True))
  assert ours(['a photo of a cat'])[0, 7:].tolist() == [0] * 70


def test_html_entities_are_unescaped_like_openai_clip(tokenizer):
  # The documented difference from transformers, which keeps '&amp;' as three tokens.
  assert tokenizer.encode('salt &amp; pepper') == tokenizer.encode('salt & pepper')


# ----------------------------------------------------------------------------- truncation
def test_truncation_keeps_bos_and_eos_and_is_reported(tokenizer):
  assert tokenizer.is_truncated(LONG_PROMPT) and not tokenizer.is_truncated('a photo of a cat')
  row = tokenizer([LONG_PROMPT])[0]
  assert row[0] == 49406 and row[-1] == 49407
  assert row[1:-1].tolist() == tokenizer.encode(LONG_PROMPT)[:75]
  assert not tokenizer.is_truncated(LONG_PROMPT, max_length=1000)
  assert tokenizer([LONG_PROMPT], max_length=10).shape == (1, 10)
  with pytest.raises(InputError, match='longer than max_length'):
    tokenizer([LONG_PROMPT], truncation=False)
  with pytest.raises(InputError, match='max_length'):
    tokenizer(['x'], max_length=1)
  with pytest.raises(InputError, match='padding'):
    tokenizer(['x'], padding='do_not_pad')


# ----------------------------------------------------------------------------- placeholders
def test_placeholder_is_one_new_id_and_leaves_the_rest_unchanged(tokenizer):
  with_e4t, e4t_id = tokenizer.with_placeholder('<e4t>')
  with_both, star_id = with_e4t.with_placeholder('*')
  assert (e4t_id, star_id) == (49408, 49409)
  assert tokenizer.vocab_size == 49408 and tokenizer.placeholders == {}  # The original is unchanged.
  assert with_e4t.placeholders == {'<e4t>': 49408} and with_both.vocab_size == 49410
  assert len(tokenizer.encode('<e4t>')) > 1 and tokenizer.encode('*') == [265]  # '*</w>'

  ids = with_both.encode('a photo of <e4t> on the beach, *.')
  assert ids == (tokenizer.encode('a photo of') + [e4t_id] + tokenizer.encode('on the beach,') + [star_id]
                 + tokenizer.encode('.'))
  assert with_both.encode('<e4t>dog') == [e4t_id] + tokenizer.encode('dog')
  assert with_both.encode('<E4T>') == tokenizer.encode('<E4T>')  # Matched case-sensitively.

  batch = with_both(['a photo of <e4t>', '<e4t> and <e4t>', 'no placeholder'])
  assert with_both.placeholder_positions(batch, e4t_id) == [[4], [1, 3], []]
  assert with_both.placeholder_positions(batch[0], e4t_id) == [4]
  assert with_both.decode(batch[1]) == '<e4t> and <e4t>'


def test_placeholder_matches_transformers_added_token(tokenizer, hf_tokenizer):
  transformers = pytest.importorskip('transformers')
  hf = transformers.CLIPTokenizer(vocab=dict(hf_tokenizer.get_vocab()), merges=[
      tuple(line.split()) for line in (ASSETS / 'merges.txt').read_text(encoding='utf-8').split('\n')[1:] if line])
  hf.add_tokens(['<e4t>'])
  ours, _ = tokenizer.with_placeholder('<e4t>')
  prompts = ['a photo of <e4t>', '<e4t>', 'a <e4t>-style painting, <e4t>s everywhere', 'no placeholder here']
  np.testing.assert_array_equal(ours(prompts), hf_batch(hf, prompts, max_length=77, padding='max_length',
                                                        truncation=True))


@pytest.mark.parametrize('bad_token, message', [
    ('', 'non-empty'), ('two words', 'whitespace'), ('tab\there', 'whitespace'),
    ('<|endoftext|>', 'collides'), ('<|startoftext|>', 'collides'), (None, 'non-empty'),
])
def test_bad_placeholders_are_rejected(tokenizer, bad_token, message):
  with pytest.raises(InputError, match=message):
    tokenizer.with_placeholder(bad_token)


def test_placeholder_cannot_be_added_twice_or_looked_up_when_absent(tokenizer):
  with_star, star_id = tokenizer.with_placeholder('*')
  with pytest.raises(InputError, match='already present'):
    with_star.with_placeholder('*')
  with pytest.raises(InputError, match='not a placeholder'):
    with_star.placeholder_positions([1, 2, 3], 320)
  with pytest.raises(InputError, match='not a placeholder'):
    tokenizer.placeholder_positions([1, 2, 3], star_id)


# ----------------------------------------------------------------------------- save / load
def test_saved_folder_round_trips_and_loads_in_transformers(tmp_path, tokenizer):
  with_placeholders, _ = tokenizer.with_placeholder('<e4t>')
  with_placeholders, _ = with_placeholders.with_placeholder('<E4T-style>')
  folder = with_placeholders.save(tmp_path / 'saved')
  prompts = PROMPTS[:12] + ['a photo of <e4t> in <E4T-style>', '<e4t><e4t>']
  expected = with_placeholders(prompts)

  reloaded = CLIPTokenizer.from_dir(folder)
  assert reloaded.placeholders == {'<e4t>': 49408, '<E4T-style>': 49409}
  np.testing.assert_array_equal(reloaded(prompts), expected)

  transformers = pytest.importorskip('transformers')
  hf = transformers.CLIPTokenizer.from_pretrained(folder)
  assert len(hf) == 49410 and hf.model_max_length == 77 and hf.pad_token_id == 49407
  np.testing.assert_array_equal(hf_batch(hf, prompts, max_length=77, padding='max_length', truncation=True),
                                expected)


def test_sd2_pad_token_survives_save(tmp_path):
  sd2 = CLIPTokenizer.from_dir(write_sd2_folder(tmp_path / 'sd2'))
  reloaded = CLIPTokenizer.from_dir(sd2.save(tmp_path / 'saved'))
  assert reloaded.pad_id == 0 and reloaded.special_tokens == sd2.special_tokens


def test_reads_a_folder_saved_by_transformers_5(tmp_path, tokenizer):
  transformers = pytest.importorskip('transformers')
  hf = transformers.CLIPTokenizer.from_pretrained(write_sd2_folder(tmp_path / 'sd2'))
  hf.add_tokens(['<e4t>'])
  hf.save_pretrained(tmp_path / 'hf_saved')  # transformers 5 writes tokenizer.json, no vocab.json.
  ours = CLIPTokenizer.from_dir(tmp_path / 'hf_saved')
  assert ours.placeholders == {'<e4t>': 49408} and ours.pad_id == 0
  prompts = ['a photo of <e4t>!', 'a photo of a cat']
  np.testing.assert_array_equal(ours(prompts), hf_batch(hf, prompts, max_length=77, padding='max_length',
                                                        truncation=True))


def test_pipeline_folder_with_a_tokenizer_subfolder_is_accepted(tmp_path):
  copy_assets(tmp_path / 'pipeline' / 'tokenizer')
  assert CLIPTokenizer.from_dir(tmp_path / 'pipeline')(['a photo of a cat'])[0, :7].tolist() == A_PHOTO_OF_A_CAT


# ----------------------------------------------------------------------------- bad folders
def test_missing_folder_or_files_raise_input_error(tmp_path):
  with pytest.raises(InputError, match='does not exist'):
    CLIPTokenizer.from_dir(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(InputError, match='vocab.json is missing'):
    CLIPTokenizer.from_dir(tmp_path / 'empty')
  folder = copy_assets(tmp_path / 'no_merges')
  (folder / 'merges.txt').unlink()
  with pytest.raises(InputError, match='merges.txt is missing'):
    CLIPTokenizer.from_dir(folder)


@pytest.mark.parametrize('file_name, content, message', [
    ('vocab.json', '{"a": 0,', 'vocab.json: not a readable JSON file'),
    ('vocab.json', '["a", "b"]', 'vocab.json: holds a JSON list'),
    ('vocab.json', '{"a": "zero"}', 'not an integer'),
    ('vocab.json', '{"a": 0, "b": 0}', 'each used once'),
    ('merges.txt', '#version: 0.2\ni n\nthis line has four\n', 'merges.txt, line 3'),
    ('merges.txt', '#version: 0.2\nzq xj\n', 'not in vocab.json'),
    ('tokenizer_config.json', '{"pad_token": "<|pad|>"}', 'pad_token'),
    ('tokenizer_config.json', '{"model_max_length": "long"}', 'model_max_length'),
    ('tokenizer_config.json', '{"added_tokens_decoder": {"49410": {"content": "<x>"}}}', 'without gaps'),
    ('special_tokens_map.json', '{"bos_token": {"nocontent": 1}}', 'special_tokens_map.json: bos_token'),
])
def test_malformed_files_raise_input_error_naming_the_file(tmp_path, file_name, content, message):
  folder = copy_assets(tmp_path / 'tokenizer')
  (folder / file_name).write_text(content, encoding='utf-8')
  with pytest.raises(InputError, match=message):
    CLIPTokenizer.from_dir(folder)


def test_non_string_prompt_raises_input_error(tokenizer):
  with pytest.raises(InputError, match='must be a string'):
    tokenizer([None])
