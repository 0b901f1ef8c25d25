"""Towers, losses, tokenizer, preprocessing, checkpoints: the model core without any server."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mim.data.synth import TOY_TEXTS
from mim.model import checkpoint as ckpt
from mim.model.config import PreprocessConfig, get_size
from mim.model.losses import LossWeights, describes_matrix, info_nce, mim_loss, same_matrix
from mim.model.preprocess import InputError, decode_image, decode_text, image_to_array
from mim.model.tokenizer import CLS_ID, PAD_ID, SEP_ID, UNK_ID, TextTokenizer
from mim.model.towers import ImageTower, MIMModel, TextTower, explicit_attention, fused_attention

TINY = get_size("tiny")


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(list(TOY_TEXTS) * 4, vocab_size=200, context_length=TINY.preprocess.context_length)


@pytest.fixture(scope="module")
def model(tok) -> MIMModel:
    torch.manual_seed(0)
    return MIMModel(TINY.model.with_vocab(tok.vocab_size)).eval()


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- towers ------------------------------------------------------------------------------------------------
def test_image_tower_shapes_and_unit_norm(model):
    x = torch.randn(5, 3, 48, 48)
    e = model.encode_image(x)
    assert e.shape == (5, TINY.model.embed_dim)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(5))


def test_text_tower_shapes_unit_norm_and_padding_invariance(model, tok):
    ids, mask = tok.encode_batch(["blue zebra mug", "red polka-dot cotton shirt"])
    e = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    assert e.shape == (2, TINY.model.embed_dim)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    # Whatever sits in the padded positions must not change the embedding.
    noisy = ids.copy()
    noisy[mask == 0] = 7
    e2 = model.encode_text(torch.from_numpy(noisy), torch.from_numpy(mask))
    torch.testing.assert_close(e, e2, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("causal", "pooling"), [(False, "cls"), (True, "eot")], ids=["bidirectional", "causal"])
def test_fused_attention_equals_the_explicit_form(causal, pooling):
    """The towers' fused attention (training, torch serving) and the explicit form the ONNX exporter traces are
    one function: FP32 outputs agree to float rounding for both towers, text padded to every length from one
    token to the full context, and so do the gradients training takes through them."""
    cfg = dataclasses.replace(TINY.model, text=dataclasses.replace(TINY.model.text, causal=causal, pooling=pooling))
    torch.manual_seed(0)
    m = MIMModel(cfg).eval()
    t = cfg.text.context_length
    ids = torch.randint(4, cfg.text.vocab_size, (t, t))
    mask = (torch.arange(t)[None, :] <= torch.arange(t)[:, None]).long()  # row i keeps i + 1 tokens
    pixels = torch.randn(3, 3, 48, 48, requires_grad=True)

    def run():
        m.zero_grad()
        img, txt = m.encode_image(pixels), m.encode_text(ids, mask)
        (img.sum() + txt.square().sum()).backward()
        return img.detach(), txt.detach(), m.text.blocks[0].attn.qkv.weight.grad.clone(), pixels.grad.clone()

    assert fused_attention()
    fused = run()
    pixels.grad = None
    with explicit_attention():
        assert not fused_attention()
        explicit = run()
    assert fused_attention()  # the context restores the fused form
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_one_image_tower_and_one_text_tower():
    """3-tower/4-tower models share weights: a trained model holds exactly one encoder per modality."""
    m = MIMModel(TINY.model)
    assert sum(isinstance(x, ImageTower) for x in m.modules()) == 1
    assert sum(isinstance(x, TextTower) for x in m.modules()) == 1


def test_wrong_image_size_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"pixel_values has shape \(2, 3, 32, 32\); expected \(batch, 3, 48, 48\)"):
        model.encode_image(torch.randn(2, 3, 32, 32))


def test_wrong_text_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"expected both \(batch, 16\)"):
        model.encode_text(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))


def test_base_size_builds_with_the_same_contract_shapes():
    base = get_size("base")
    assert base.model.vision.image_size == base.preprocess.image_size == 224
    assert base.model.vision.num_patches == 196


# --- losses ------------------------------------------------------------------------------------------------
def test_info_nce_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(2.0)
    # logits = 2 * a @ b.T = [[1.2, 0], [1.6, 2]]
    row = [-math.log(math.exp(1.2) / (math.exp(1.2) + 1)), -math.log(math.exp(2) / (math.exp(1.6) + math.exp(2)))]
    col = [-math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6))), -math.log(math.exp(2) / (1 + math.exp(2)))]
    expected = 0.5 * (sum(row) / 2 + sum(col) / 2)
    assert float(info_nce(a, b, scale)) == pytest.approx(expected, rel=1e-6)


def test_false_negative_masking_removes_the_pair_from_the_denominator():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two rows of the same product
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    scale = torch.tensor(10.0)
    unmasked = float(info_nce(a, b, scale))
    masked = float(info_nce(a, b, scale, same_matrix([7, 7])))
    assert unmasked == pytest.approx(math.log(2), rel=1e-6)  # each positive competes with an identical "negative"
    assert masked == pytest.approx(0.0, abs=1e-6)  # with the false negative masked nothing competes


def test_describes_matrix_masks_short_queries_that_fit_other_products():
    titles = ["blue zebra-striped ceramic mug", "red zebra-striped ceramic mug"]
    m = describes_matrix(titles, ["zebra mug", "red mug"])
    assert m.tolist() == [[True, False], [True, True]]


def test_objectives_add_the_right_terms():
    torch.manual_seed(0)
    q, p, t, s = (torch.nn.functional.normalize(torch.randn(4, 8), dim=-1) for _ in range(4))
    scale = torch.tensor(5.0)
    pids, titles, shorts = [0, 1, 2, 3], ["a x", "b y", "c z", "d w"], ["a", "b", "c", "d"]
    dml, parts = mim_loss("dml", scale, q, p, None, None, pids)
    assert set(parts) == {"qp"}
    three, parts3 = mim_loss("3tower", scale, q, p, t, None, pids, titles)
    assert set(parts3) == {"qp", "qt", "pt"}
    assert float(three) == pytest.approx(parts3["qp"] + parts3["qt"] + parts3["pt"], rel=1e-6)
    four, parts4 = mim_loss("4tower", scale, q, p, t, s, pids, titles, shorts)
    assert set(parts4) == {"qp", "qt", "pt", "qs", "ps"}
    assert float(four) == pytest.approx(sum(parts4.values()), rel=1e-6)
    with pytest.raises(ValueError, match="unknown objective 'x'"):
        mim_loss("x", scale, q, p, t, s, pids)
    with pytest.raises(ValueError, match="needs title embeddings"):
        mim_loss("3tower", scale, q, p, None, None, pids)
    # --align-weight scales every image-text term; the image-image term keeps weight 1.
    half, parts_half = mim_loss("4tower", scale, q, p, t, s, pids, titles, shorts, LossWeights.uniform(0.5))
    assert parts_half == pytest.approx(parts4)
    assert float(half) == pytest.approx(parts4["qp"] + 0.5 * (float(four) - parts4["qp"]), rel=1e-6)
    for bad in (-1.0, float("inf"), float("nan"), "1"):
        with pytest.raises(ValueError, match="image-text loss weight .*; expected a finite number >= 0"):
            LossWeights.uniform(bad)


# --- tokenizer ---------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_unknown_words_and_truncation(tok, tmp_path):
    ids, mask = tok.encode_batch(["Blue Zebra mug", "qqqq xylophone", "mug " * 100])
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == (3, 16)
    assert tok.decode(ids[0]) == "blue zebra mug"  # lowercased, round trip
    assert ids[0, 0] == CLS_ID and SEP_ID in ids[0] and ids[0, -1] == PAD_ID
    assert UNK_ID in ids[1]  # unknown words never crash; they become [UNK] pieces
    assert mask[2].sum() == 16 and ids[2, -1] == SEP_ID  # long text is truncated to the context, keeping [SEP]
    tok.save(tmp_path / "t.json")
    again = TextTokenizer.from_file(tmp_path / "t.json", 16)
    np.testing.assert_array_equal(again.encode_batch(["blue zebra mug"])[0], ids[:1])


# --- preprocessing -----------------------------------------------------------------------------------------
def test_preprocess_keeps_aspect_and_normalises():
    cfg = PreprocessConfig(image_size=64)
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    x = image_to_array(img, cfg)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], (1.0 - cfg.mean[0]) / cfg.std[0], rtol=1e-5)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA"])
def test_decode_converts_every_mode_to_rgb(mode):
    img = Image.new("RGB", (40, 30), (10, 200, 30)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(_png(img, fmt), PreprocessConfig(image_size=64))
    assert out.mode == "RGB" and out.size == (40, 30)


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    out = decode_image(_png(img), PreprocessConfig(image_size=64))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = _png(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data, PreprocessConfig(image_size=64)).size == (20, 40)


def test_bad_images_raise_clear_errors():
    cfg = PreprocessConfig(image_size=64, max_image_pixels=10_000)
    with pytest.raises(InputError, match="image is empty"):
        decode_image(b"", cfg)
    with pytest.raises(InputError, match="could not decode image"):
        decode_image(b"not an image at all", cfg)
    good = _png(Image.new("RGB", (64, 64)))
    with pytest.raises(InputError, match="could not decode image"):
        decode_image(good[: len(good) // 2], cfg)
    with pytest.raises(InputError, match=r"200x200 = 40000 pixels, over the limit of 10000"):
        decode_image(_png(Image.new("RGB", (200, 200))), cfg)


def test_text_checks():
    cfg = PreprocessConfig(image_size=64, max_text_bytes=100)
    assert decode_text(b"zebra mug", cfg) == "zebra mug"
    with pytest.raises(InputError, match="text is empty"):
        decode_text(b"   ", cfg)
    with pytest.raises(InputError, match="not valid UTF-8"):
        decode_text(b"\xff\xfe mug", cfg)
    with pytest.raises(InputError, match="over the limit of 100"):
        decode_text("a" * 101, cfg)


# --- checkpoints -------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(model, tok, tmp_path):
    out = ckpt.save_checkpoint(tmp_path / "c", model, TINY.preprocess, tok, {"objective": "3tower", "step": 3})
    back = ckpt.load_checkpoint(out, expected=model.cfg)
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(back.model.encode_image(x), model.encode_image(x))
    assert back.meta["step"] == 3 and back.pre_cfg == TINY.preprocess
    assert len(back.model_id) == 16 and not list(tmp_path.glob("c/.*.tmp"))


def test_checkpoint_with_another_config_is_refused(model, tok, tmp_path):
    out = ckpt.save_checkpoint(tmp_path / "c", model, TINY.preprocess, tok)
    other = dataclasses.replace(model.cfg, embed_dim=64)
    with pytest.raises(ckpt.CheckpointError, match="embed_dim: expected 64, got 128"):
        ckpt.load_checkpoint(out, expected=other)
    raw = json.loads((out / "config.json").read_text())
    raw["preprocess"]["image_size"] = 32
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ckpt.CheckpointError, match="disagrees with the model"):
        ckpt.load_checkpoint(out)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nowhere")


def test_tiny_64_is_tiny_at_64_px():
    big = get_size("tiny-64")
    assert big.preprocess.image_size == big.model.vision.image_size == 64
    assert big.model.vision.num_patches == 64 and big.model.name == "tiny-64"
    same = {f: getattr(TINY.model.vision, f) for f in ("patch_size", "width", "layers", "heads", "mlp_ratio")}
    assert same == {f: getattr(big.model.vision, f) for f in same} and big.model.text == TINY.model.text
