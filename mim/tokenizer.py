"""A word-piece tokenizer built from the catalog's own text (no downloads), with a fixed context length.

Layout of every encoded row: [CLS] tokens... [SEP] [PAD]...; the text tower pools the [CLS] position.
Unknown words map to [UNK] pieces instead of failing; text longer than the context is truncated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP]  # ids 0..3, in this order
PAD_ID, UNK_ID, CLS_ID, SEP_ID = range(4)


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length={context_length}; need at least 2 for [CLS] and [SEP]")
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(f"tokenizer must map {tok} to id {i}, got {tokenizer.token_to_id(tok)}")
        self._tok = tokenizer
        self.context_length = context_length
        # Truncation keeps room for [CLS] and [SEP], which we add ourselves.
        self._tok.no_padding()
        self._tok.no_truncation()

    @classmethod
    def train(
        cls, texts: Iterable[str], *, vocab_size: int, context_length: int, lowercase: bool = True
    ) -> TextTokenizer:
        """Build the vocabulary from `texts`, deterministically.

        The library's WordPiece trainer orders equally frequent merges differently from run to run, which gives
        the same text different ids in two runs with the same seed. Here the vocabulary is: the special tokens,
        every character seen (alone and as a "##" continuation, so any word made of known characters
        tokenizes), then whole words by frequency, ties broken alphabetically, up to `vocab_size`."""
        norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        normalizer = normalizers.Sequence(norm)
        pre = pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
        chars = sorted({c for w in counts for c in w})
        vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
        if vocab_size < len(vocab):
            raise ValueError(
                f"vocab_size={vocab_size} cannot hold the {len(vocab)} special and character tokens; raise it"
            )
        seen = set(vocab)
        words = sorted((w for w in counts if w not in seen), key=lambda w: (-counts[w], w))
        vocab += words[: vocab_size - len(vocab)]
        tok = Tokenizer(
            models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=UNK, max_input_chars_per_word=64)
        )
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        tok.decoder = decoders.WordPiece()
        return cls(tok, context_length)

    @classmethod
    def from_file(cls, path: str | Path, context_length: int) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found; it is saved with every checkpoint/export")
        return cls(Tokenizer.from_file(str(path)), context_length)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (input_ids, attention_mask), both int64 (N, context_length)."""
        n, t = len(texts), self.context_length
        ids = np.full((n, t), PAD_ID, dtype=np.int64)
        mask = np.zeros((n, t), dtype=np.int64)
        for row, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            body = enc.ids[: t - 2]
            seq = [CLS_ID, *body, SEP_ID]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) > SEP_ID])
