"""CLIP's tokenizer and image preprocessing against transformers' CLIPTokenizer and CLIPImageProcessor."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from _clip_helpers import TITLES, hf_image_processor, real_photos, write_clip_vocab
from PIL import Image

from mim.model.config import PreprocessConfig
from mim.model.preprocess import preprocess_image_bytes
from mim.model.tokenizer import ClipTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

COLOURS = ["red", "Blue", "GREEN", "off-white", "navy/gold", "beige", "rosé", "schwarz"]
PATTERNS = ["zebra-striped", "polka-dot", "plaid", "checkerboard", "zig zag", "star-print", "solid"]
THINGS = ["mug", "T-shirt", "running shoes", "tote bag", "desk lamp", "water bottle", "bucket hat", "armchair"]
ODD = [
    "",
    " ",
    "\t\n",
    "a",
    "A",
    "ÀÉÎÕÜ àéîõü ßøåæœ",
    "naïve café crème brûlée",
    "Ｆｕｌｌｗｉｄｔｈ ｍｕｇ",  # NFC keeps fullwidth forms (NFKC would not)
    "e\u0301 vs é",  # combining accent: NFC composes it
    "北京 上海 東京 서울",
    "مرحبا بالعالم",
    "Привет, мир",
    "ελληνικά γράμματα",
    "हिन्दी पाठ",
    "🐶🐱🐭 emoji only",
    "👩‍👩‍👧‍👦 family, 👍🏽 thumbs",
    "🇫🇷🇯🇵 flags",
    "don't can't won't I'm you're we've they'll he'd",
    "DON'T SHOUT",
    "price: $19.99 (was $25) — 20% off!!!",
    "size 42/44, 3x4 cm, 1,000 pcs",
    "email@example.com https://example.com/a?b=c",
    "<|startoftext|>typed specials<|endoftext|>",
    "tabs\tand\nnewlines\r\nmixed   spaces",
    "zero\u200bwidth\u00a0nbsp",
    "a" * 300,
    "word " * 200,
    "🐶" * 100,
]


def strings() -> list[str]:
    """About 400 strings: catalog-like titles and queries in several casings, plus unicode and edge cases."""
    titles = [f"{c} {p} {t}" for c, p, t in itertools.product(COLOURS, PATTERNS, THINGS)]
    titles = titles[::2]  # 224 of the 448
    queries = [f"like this but {c}" for c in COLOURS] + [f"same {t}, in {c}!" for t, c in zip(THINGS, COLOURS)]
    return titles + [t.upper() for t in titles[:100]] + queries + ODD + TITLES + [s + " " + s for s in ODD[5:20]]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-vocab")
    write_clip_vocab(folder)
    return ClipTokenizer.bundled(77), transformers.CLIPTokenizer.from_pretrained(str(folder))


def test_clip_tokenizer_matches_transformers(tokenizers):
    ours, ref = tokenizers
    texts = strings()
    assert len(texts) >= 350
    ids, mask = ours.encode_batch(texts)
    want = ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    rows = [i for i in range(len(texts)) if not (ids[i] == want["input_ids"][i]).all()]
    assert not rows, [(texts[i], ids[i][:10], want["input_ids"][i][:10]) for i in rows[:3]]
    assert (mask == want["attention_mask"]).all()
    # The layout the text tower relies on: start token, end token at the last attended position.
    lengths = mask.sum(1)
    assert (ids[:, 0] == 49406).all() and (ids[np.arange(len(texts)), lengths - 1] == 49407).all()
    assert lengths.max() == 77 and ours.vocab_size == 49408


def test_clip_tokenizer_roundtrips_through_its_file(tokenizers, tmp_path):
    ours, _ = tokenizers
    ours.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json", "clip_bpe", 77)
    texts = strings()
    assert all((a == b).all() for a, b in zip(ours.encode_batch(texts), again.encode_batch(texts)))
    # Every piece ends a "word" in CLIP's BPE, so decoding spaces out punctuation, as CLIP's own decoder does.
    assert again.decode(again.encode_batch(["Red polka-dot mug"])[0][0]) == "red polka - dot mug"
    with pytest.raises(ValueError, match=r"not a CLIP tokenizer"):
        from mim.model.tokenizer import TextTokenizer

        TextTokenizer.train(["a b c"], vocab_size=64, context_length=8).save(tmp_path / "wp.json")
        load_tokenizer(tmp_path / "wp.json", "clip_bpe", 77)
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer(tmp_path / "tokenizer.json", "sentencepiece", 77)


@pytest.mark.parametrize("size", [224, 32])
def test_clip_preprocessing_matches_transformers(size):
    """CLIP's preprocessing (shorter side to S bicubic with the longer side truncated, centre crop, OpenAI's
    mean/std) equals CLIPImageProcessor's on real photos of several aspect ratios, to float precision."""
    cfg = PreprocessConfig(image_size=size, context_length=77, tokenizer="clip_bpe", resize_mode="clip")
    proc = hf_image_processor(size)
    worst = 0.0
    for data in real_photos():
        ours = preprocess_image_bytes(data, cfg)
        ref = proc(Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="np")["pixel_values"][0]
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"CLIP preprocessing at {size} px: max abs diff {worst:.2e} over {len(real_photos())} photos")
    assert worst <= 1e-5
