"""Tokenizers with a fixed context length: a word-piece one built from the catalog's own text (no downloads),
the default for models trained here, and CLIP's byte-level BPE for imported CLIP checkpoints.

Word-piece rows are [CLS] tokens... [SEP] [PAD]...; the text tower pools the [CLS] position.
Unknown words map to [UNK] pieces instead of failing; text longer than the context is truncated.
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP]  # ids 0..3, in this order
PAD_ID, UNK_ID, CLS_ID, SEP_ID = range(4)


class _ContextTokenizer:
    """What both tokenizers share: a `tokenizers.Tokenizer` that pads and truncates nothing itself (each subclass
    adds its own start/end tokens and pads to `context_length`), loaded from and saved to one JSON file."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        self._tok = tokenizer
        self.context_length = context_length
        self._tok.no_padding()
        self._tok.no_truncation()

    @classmethod
    def from_file(cls, path: str | Path, context_length: int):
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


class TextTokenizer(_ContextTokenizer):
    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length={context_length}; need at least 2 for [CLS] and [SEP]")
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(tok) != i:
                raise ValueError(f"tokenizer must map {tok} to id {i}, got {tokenizer.token_to_id(tok)}")
        # [CLS] and [SEP] are added by encode_batch, which also truncates to leave room for them.
        super().__init__(tokenizer, context_length)

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


# --- CLIP's byte-level BPE -----------------------------------------------------------------------------------
# Layout of every encoded row: <|startoftext|> tokens... <|endoftext|> then <|endoftext|> as padding (the mask
# marks it), as Hugging Face's CLIPTokenizer pads. The text tower pools the last attended position, so the pad
# id never reaches an embedding. Text longer than the context keeps its first context_length - 2 tokens.
CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's published merge list (MIT licence, see mim/model/assets/README.md): 256 byte tokens, the same 256 with the
# end-of-word marker, the first 48,894 merges and the two special tokens make its 49,408-token vocabulary.
CLIP_BPE_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 49152 - 256 - 2
# CLIP's pre-tokenizer: its special tokens, English contractions, runs of letters, single digits, runs of
# other non-space characters. Spaces separate pieces and are dropped.
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes, in CLIP's vocabulary order: the printable
    Latin-1 bytes as themselves, then every other byte as chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def clip_vocab_from_bpe_file(path: str | Path = CLIP_BPE_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's `bpe_simple_vocab_16e6.txt.gz` (a header line, then one merge "a b" per line) -> (vocab, merges)."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")[1 : CLIP_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {CLIP_NUM_MERGES} merges of two symbols each; is it CLIP's BPE file?")
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_SOT, CLIP_EOT]
    return {t: i for i, t in enumerate(tokens)}, merges


class ClipTokenizer(_ContextTokenizer):
    """CLIP's tokenizer on the `tokenizers` library: NFC, whitespace runs to one space, lowercase, CLIP's split,
    byte-level BPE with the "</w>" end-of-word marker. The same pipeline as Hugging Face's CLIPTokenizer;
    unlike OpenAI's reference code it does not run ftfy / HTML unescaping first (text is taken as sent)."""

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length={context_length}; need at least 2 for the start and end tokens")
        self.sot_id, self.eot_id = tokenizer.token_to_id(CLIP_SOT), tokenizer.token_to_id(CLIP_EOT)
        if self.sot_id is None or self.eot_id is None:
            raise ValueError(f"not a CLIP tokenizer: {CLIP_SOT} or {CLIP_EOT} missing from its vocabulary")
        super().__init__(tokenizer, context_length)

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], merges: Sequence[tuple[str, str]], context_length: int) -> ClipTokenizer:
        tok = Tokenizer(
            models.BPE(
                vocab,
                list(merges),
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                unk_token=CLIP_EOT,
                fuse_unk=False,
            )
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Typed special tokens become their ids, as in CLIP's own tokenizer.
        tok.add_special_tokens([CLIP_SOT, CLIP_EOT])
        return cls(tok, context_length)

    @classmethod
    def bundled(cls, context_length: int = 77) -> ClipTokenizer:
        """CLIP's published vocabulary, shipped with the package (what OpenCLIP checkpoints use)."""
        return cls.from_vocab(*clip_vocab_from_bpe_file(), context_length)

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (input_ids, attention_mask), both int64 (N, context_length)."""
        n, t = len(texts), self.context_length
        ids = np.full((n, t), self.eot_id, dtype=np.int64)
        mask = np.zeros((n, t), dtype=np.int64)
        for row, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            seq = [self.sot_id, *enc.ids[: t - 2], self.eot_id]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        body = [int(i) for i in ids if int(i) not in (self.sot_id, self.eot_id)]
        return self._tok.decode(body).replace("</w>", " ").strip()


Tokenizers = TextTokenizer | ClipTokenizer


def load_tokenizer(path: str | Path, kind: str, context_length: int) -> Tokenizers:
    """The tokenizer a checkpoint or an installed repository names in its PreprocessConfig.tokenizer."""
    if kind == "wordpiece":
        return TextTokenizer.from_file(path, context_length)
    if kind == "clip_bpe":
        return ClipTokenizer.from_file(path, context_length)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'wordpiece' or 'clip_bpe'")
