"""CLIP's byte-level BPE tokenizer, built with the `tokenizers` library from a
checkpoint's own `tokenizer/` files (never a download; no torch, no transformers).

The pipeline is transformers' `CLIPTokenizer` (v5, itself `tokenizers`-backed):
NFC + whitespace collapse + lowercase, CLIP's split regex, byte-level BPE with the
`</w>` end-of-word suffix, then `<|startoftext|> ... <|endoftext|>`, truncated and
padded to `model_max_length`.
"""
import json
import os
from typing import Optional, Sequence, Union

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ddm_jax.errors import WeightsError

_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
          r"""|[^\s\p{L}\p{N}]+""")
_DEFAULTS = dict(bos_token='<|startoftext|>', eos_token='<|endoftext|>',
                 unk_token='<|endoftext|>', pad_token='<|endoftext|>')


def _read_json(path):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WeightsError(f'{path}: cannot read JSON ({e})') from e


def _content(token):
  """Special tokens are stored as strings or as AddedToken dicts."""
  return token.get('content') if isinstance(token, dict) else token


class CLIPTokenizer:
  """`tok(prompts) -> int32 [B, model_max_length]`: BOS, the prompt's tokens (truncated),
  EOS, then padding with `pad_token`."""

  def __init__(self, tokenizer: Tokenizer, model_max_length: int = 77, **special_tokens):
    self.tokenizer = tokenizer
    self.model_max_length = int(model_max_length)
    special = {**_DEFAULTS, **{k: v for k, v in special_tokens.items() if v}}
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in dict.fromkeys(special.values())])
    for name, token in special.items():
      token_id = tokenizer.token_to_id(token)
      if token_id is None:
        raise WeightsError(f'tokenizer: {name} {token!r} is not in the vocabulary')
      setattr(self, name, token)
      setattr(self, f'{name}_id', token_id)

  @classmethod
  def from_pretrained(cls, folder: str) -> 'CLIPTokenizer':
    """Reads `vocab.json` + `merges.txt` (or a `tokenizer.json`), and `model_max_length` and
    special tokens from `tokenizer_config.json` / `special_tokens_map.json` when present
    (the latter wins, as in transformers)."""
    path = lambda name: os.path.join(folder, name)
    if os.path.isfile(path('vocab.json')) and os.path.isfile(path('merges.txt')):
      try:
        vocab, merges = BPE.read_file(path('vocab.json'), path('merges.txt'))
      except Exception as e:  # tokenizers raises its own Exception type on bad files
        raise WeightsError(f'{folder}: cannot read vocab.json/merges.txt ({e})') from e
      tok = Tokenizer(BPE(vocab, merges, continuing_subword_prefix='', end_of_word_suffix='</w>',
                          fuse_unk=False, unk_token=_DEFAULTS['unk_token'], dropout=None))
      tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '),
                                             normalizers.Lowercase()])
      tok.pre_tokenizer = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(_SPLIT), behavior='removed', invert=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False)])
      tok.decoder = decoders.ByteLevel()
    elif os.path.isfile(path('tokenizer.json')):
      try:
        tok = Tokenizer.from_file(path('tokenizer.json'))
      except Exception as e:
        raise WeightsError(f'{path("tokenizer.json")}: cannot read ({e})') from e
      tok.no_padding()
      tok.no_truncation()
    else:
      raise WeightsError(f'{folder}: no tokenizer files (need vocab.json and merges.txt, or tokenizer.json)')

    cfg = _read_json(path('tokenizer_config.json')) if os.path.isfile(path('tokenizer_config.json')) else {}
    if os.path.isfile(path('special_tokens_map.json')):
      cfg.update(_read_json(path('special_tokens_map.json')))
    special = {k: _content(cfg.get(k)) for k in _DEFAULTS}
    max_len = cfg.get('model_max_length', 77)
    if not isinstance(max_len, int) or max_len > 10 ** 6:  # transformers' "no limit" sentinel
      max_len = 77
    return cls(tok, max_len, **special)

  @property
  def vocab_size(self):
    return self.tokenizer.get_vocab_size()

  def tokenize(self, text: str):
    """BPE token ids of `text` without BOS/EOS, padding or truncation."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def __call__(self, texts: Union[str, Sequence[str]], max_length: Optional[int] = None) -> np.ndarray:
    texts = [texts] if isinstance(texts, str) else list(texts)
    length = max_length or self.model_max_length
    out = np.full((len(texts), length), self.pad_token_id, np.int32)
    for row, enc in zip(out, self.tokenizer.encode_batch(texts, add_special_tokens=False)):
      ids = [self.bos_token_id] + enc.ids[:length - 2] + [self.eos_token_id]
      row[:len(ids)] = ids
    return out

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    text = self.tokenizer.decode(ids, skip_special_tokens=True)
    return text.replace('</w>', ' ').strip()
