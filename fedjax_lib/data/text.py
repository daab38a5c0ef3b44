"""PFLlib's text pipeline (AG News, Sogou News) without torchtext.

PFLlib's ``dataset/utils/language_utils.py:tokenizer(text, max_len=200, max_tokens=32000)``:

1. **Tokenise** with torchtext's ``basic_english``: lower-case, then these regex
   substitutions in order, then split on whitespace:

   ======================  ===========  ===================================
   pattern                 replacement  effect
   ======================  ===========  ===================================
   ``'``                   `` '  ``     the apostrophe becomes its own token
   ``"``                   (nothing)    double quotes are dropped
   ``.`` ``,`` ``(`` ``)``  `` x ``      split off as tokens
   ``!`` ``?``
   ``<br />``              space        HTML line breaks removed
   ``;`` ``:``             space        dropped
   ``\\s+``                space
   ======================  ===========  ===================================

2. **Vocabulary** (``build_vocab_from_iterator``): count the tokens of every text, order them
   by descending count, ties by code-point order of the token; keep the first
   ``max_tokens - 4``; drop any kept token that equals a special (the list is cut *before*
   that, so then the vocabulary is shorter); prepend the specials
   ``['<pad>', 'cls', '<unk>', '<eos>']`` (ids 0..3). Unknown tokens map to ``<unk>`` = 2.
3. **Encode** each text as ``[vocab['<cls>']] + ids``, padded with 0 (``<pad>``) or cut to
   ``max_len`` (200). The stored length is the padded length, always ``max_len``.

Two PFLlib details kept on purpose, because they are what its models were trained on:

* the special is spelled ``'cls'`` but the lookup asks for ``'<cls>'``, which is not in the
  vocabulary, so every sequence starts with ``<unk>`` (2), not 1;
* the vocabulary is counted over every text given, and PFLlib gives it the official train and
  test sets merged.
"""

from __future__ import annotations

import collections
import re
from typing import Iterable, Sequence

import numpy as np

SPECIALS = ("<pad>", "cls", "<unk>", "<eos>")
PAD_ID = 0
UNK_TOKEN = "<unk>"
MAX_LEN = 200
MAX_TOKENS = 32000

_PATTERNS = [
    (re.compile(r"\'"), " '  "),
    (re.compile(r"\""), ""),
    (re.compile(r"\."), " . "),
    (re.compile(r"<br \/>"), " "),
    (re.compile(r","), " , "),
    (re.compile(r"\("), " ( "),
    (re.compile(r"\)"), " ) "),
    (re.compile(r"\!"), " ! "),
    (re.compile(r"\?"), " ? "),
    (re.compile(r"\;"), " "),
    (re.compile(r"\:"), " "),
    (re.compile(r"\s+"), " "),
]


def basic_english(line: str) -> list[str]:
  """torchtext's ``basic_english`` tokenizer (see the module docstring).

  >>> basic_english('He said: "Don\\'t!" (twice).')
  ['he', 'said', 'don', "'", 't', '!', '(', 'twice', ')', '.']
  """
  line = line.lower()
  for pattern, replacement in _PATTERNS:
    line = pattern.sub(replacement, line)
  return line.split()


def build_vocab(token_lists: Iterable[Sequence[str]], max_tokens: int = MAX_TOKENS,
                specials: Sequence[str] = SPECIALS) -> list[str]:
  """torchtext's ``build_vocab_from_iterator(..., specials, special_first=True, max_tokens)``.

  Returns:
    The vocabulary as a list: ``vocab[i]`` is the token with id ``i``.
  """
  if len(specials) >= max_tokens:
    raise ValueError(f"max_tokens={max_tokens} leaves no room beside {len(specials)} specials")
  counts: collections.Counter = collections.Counter()
  for tokens in token_lists:
    counts.update(tokens)
  ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
  kept = [token for token, _ in ranked[: max_tokens - len(specials)]]
  special_set = set(specials)
  return list(specials) + [token for token in kept if token not in special_set]


def encode(token_lists: Sequence[Sequence[str]], vocab: Sequence[str],
           max_len: int = MAX_LEN) -> np.ndarray:
  """``[N, max_len]`` int32 ids: ``vocab['<cls>']`` (``<unk>`` unless the vocabulary holds
  ``'<cls>'``), then each token's id (``<unk>`` if absent), zero-padded or cut to ``max_len``."""
  index = {token: i for i, token in enumerate(vocab)}
  unk = index[UNK_TOKEN]
  first = index.get("<cls>", unk)
  ids = np.full((len(token_lists), max_len), PAD_ID, dtype=np.int32)
  for row, tokens in enumerate(token_lists):
    sequence = [first] + [index.get(token, unk) for token in tokens[: max_len - 1]]
    ids[row, : len(sequence)] = sequence
  return ids


def tokenize_texts(texts: Sequence[str], max_len: int = MAX_LEN,
                   max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, list[str]]:
  """PFLlib's ``tokenizer(texts, max_len, max_tokens)``: ``(ids [N, max_len] int32, vocab)``."""
  token_lists = [basic_english(text) for text in texts]
  vocab = build_vocab(token_lists, max_tokens)
  return encode(token_lists, vocab, max_len), vocab
