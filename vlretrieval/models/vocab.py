"""Offline WordPiece vocabularies built from captions.

Tiny demo models cannot download a pretrained vocabulary, so they get one built from the training
captions. The file is in the WordPiece ``vocab.txt`` format (one token per line, the line number is the
id) that BERT/ERNIE tokenizers read, so the saved model directory reloads with the ordinary
``from_pretrained`` and no network.

Chinese text is tokenized one character per token by the BasicTokenizer, so the vocabulary is
character-level. Non-Chinese words (Latin letters, digits) of the captions are tokens of their own,
so WordPiece's longest match keeps a known English word in one piece (a caption of ten words stays
about ten tokens, not fifty). The vocabulary also holds each of their characters both as a word start
(``a``) and as a continuation (``##a``), so an unseen word made of known characters still tokenizes
without ``[UNK]``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from ..io import atomic_open

# The ERNIE vocabulary puts these first, in this order; ``[PAD]`` must be id 0 because the model's
# embedding ``padding_idx`` and its implicit attention mask both assume ``pad_token_id == 0``.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
CONTINUATION_PREFIX = "##"


def _pretokenizer(do_lower_case: bool):
    # The same pre-tokenizer the ERNIE tokenizer runs before WordPiece, so the vocabulary covers
    # exactly the words the tokenizer will look up (lower-casing, accent stripping, CJK splitting).
    from paddlenlp.transformers import BasicTokenizer

    return BasicTokenizer(do_lower_case=do_lower_case)


def count_pieces(texts: Iterable[str], *, do_lower_case: bool = True) -> Counter:
    """Count the whole words of ``texts`` and the WordPiece pieces that spell them character by character."""
    basic = _pretokenizer(do_lower_case)
    counts: Counter = Counter()
    for text in texts:
        for word in basic.tokenize(text):
            if len(word) > 1:
                counts[word] += 1
            counts[word[0]] += 1
            for char in word[1:]:
                counts[CONTINUATION_PREFIX + char] += 1
    return counts


def build_vocab(
    texts: Iterable[str],
    *,
    do_lower_case: bool = True,
    min_count: int = 1,
    max_size: int | None = None,
    extra_tokens: Sequence[str] = (),
) -> list[str]:
    """Build a deterministic vocabulary: special tokens, then pieces by falling count, ties by code point.

    ``extra_tokens`` are kept even when unseen (after the specials), e.g. characters a later split may
    contain. ``max_size`` counts the special tokens too. The result depends only on the multiset of
    texts, never on iteration order of hashes or on the machine.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts = count_pieces(texts, do_lower_case=do_lower_case)
    tokens: list[str] = list(SPECIAL_TOKENS)
    seen = set(tokens)
    for token in extra_tokens:
        if token not in seen:
            tokens.append(token)
            seen.add(token)
    ranked = sorted(
        (item for item in counts.items() if item[1] >= min_count and item[0] not in seen),
        key=lambda item: (-item[1], item[0]),
    )
    tokens.extend(token for token, _ in ranked)
    if max_size is not None:
        if max_size < len(SPECIAL_TOKENS):
            raise ValueError(f"max_size {max_size} is smaller than the {len(SPECIAL_TOKENS)} special tokens")
        tokens = tokens[:max_size]
    for token in tokens:
        if not token or any(ch in token for ch in "\r\n"):
            # One token per line is the file format; a token with a newline would shift every id after it.
            raise ValueError(f"token {token!r} cannot be written to a line-based vocabulary file")
    return tokens


def write_vocab(tokens: Sequence[str], path: str | os.PathLike) -> Path:
    """Write ``tokens`` as a ``vocab.txt`` (line number = id), atomically."""
    if list(tokens[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
        raise ValueError(f"a vocabulary must start with {SPECIAL_TOKENS}, got {list(tokens[:5])}")
    if len(set(tokens)) != len(tokens):
        duplicates = sorted(t for t, n in Counter(tokens).items() if n > 1)
        raise ValueError(f"duplicate vocabulary tokens: {duplicates[:10]}")
    path = Path(path)
    with atomic_open(path) as handle:
        for token in tokens:
            handle.write(token + "\n")
    return path


def read_vocab(path: str | os.PathLike) -> list[str]:
    """Read a ``vocab.txt`` back into its token list."""
    with open(path, "r", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def build_vocab_file(texts: Iterable[str], path: str | os.PathLike, **kwargs) -> list[str]:
    """:func:`build_vocab` followed by :func:`write_vocab`; returns the tokens written."""
    tokens = build_vocab(texts, **kwargs)
    write_vocab(tokens, path)
    return tokens
