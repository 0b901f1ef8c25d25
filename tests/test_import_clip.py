"""Importing pretrained CLIP checkpoints: parity of our towers with transformers' CLIPModel on real photos and
titles (Hugging Face and OpenCLIP layouts), and clear refusals that leave nothing half-written."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _clip_helpers import (
    TINY_EMBED,
    TINY_TEXT,
    TITLES,
    hf_image_embeddings,
    hf_text_embeddings,
    hf_to_openclip,
    openclip_arch_json,
    parity,
    random_clip,
    real_photos,
    save_hf_folder,
    write_clip_vocab,
)
from safetensors.torch import save_file

from mim.model.checkpoint import load_checkpoint, read_config
from mim.model.config import PreprocessConfig, get_size
from mim.model.import_clip import ClipImportError, import_hf, import_openclip, openclip_model_config
from mim.model.preprocess import preprocess_image_bytes
from mim.model.towers import MIMModel
from mimsearch.commands.import_clip import main

MIN_COSINE = 0.9999


def ours_images(ck, photos: list[bytes]) -> np.ndarray:
    pixels = np.stack([preprocess_image_bytes(p, ck.pre_cfg) for p in photos])
    with torch.no_grad():
        return ck.model.encode_image(torch.from_numpy(pixels)).numpy()


def ours_texts(ck, texts: list[str]) -> np.ndarray:
    ids, mask = ck.tokenizer.encode_batch(texts)
    with torch.no_grad():
        return ck.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def check_parity(ck, ref_model, tokenizer_dir: Path, label: str) -> None:
    photos = real_photos()
    img_cos, img_diff = parity(ours_images(ck, photos), hf_image_embeddings(ref_model, photos))
    txt_cos, txt_diff = parity(ours_texts(ck, TITLES), hf_text_embeddings(ref_model, tokenizer_dir, TITLES))
    print(
        f"{label}: images ({len(photos)}) min cosine {img_cos:.8f} max abs diff {img_diff:.2e}; "
        f"titles ({len(TITLES)}) min cosine {txt_cos:.8f} max abs diff {txt_diff:.2e}"
    )
    assert img_cos >= MIN_COSINE and txt_cos >= MIN_COSINE, (img_cos, txt_cos)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    model = random_clip()
    return model, save_hf_folder(model, tmp_path_factory.mktemp("hf") / "tiny-clip")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_import_matches_transformers(tmp_path, act):
    model = random_clip(act=act, seed=1)
    folder = save_hf_folder(model, tmp_path / "hf")
    out = import_hf(folder, tmp_path / "ours")
    ck = load_checkpoint(out)
    assert ck.model_cfg.vision.activation == act and ck.model_cfg.text.activation == act
    assert ck.model_cfg.text.causal and ck.model_cfg.text.pooling == "eot"
    assert ck.pre_cfg.tokenizer == "clip_bpe" and ck.pre_cfg.resize_mode == "clip"
    check_parity(ck, model, folder, f"HF layout, {act}")


def test_hf_import_towers_on_same_inputs(hf_clip, tmp_path):
    """The towers alone (same pixels, same ids), so a tokenizer or preprocessing match cannot hide a tower bug."""
    model, folder = hf_clip
    ck = load_checkpoint(import_hf(folder, tmp_path / "ours"))
    pixels = torch.randn(6, 3, 32, 32)
    ids, mask = ck.tokenizer.encode_batch(TITLES)
    with torch.no_grad():
        cos_i, _ = parity(
            ck.model.encode_image(pixels).numpy(), model.get_image_features(pixel_values=pixels).pooler_output
        )
        ref_t = model.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        cos_t, _ = parity(
            ck.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy(), ref_t.pooler_output
        )
    assert min(cos_i, cos_t) >= MIN_COSINE


def test_hf_import_reads_tokenizer_json(hf_clip, tmp_path):
    """A folder with only tokenizer.json (what transformers 5 saves) gives the same ids as vocab.json/merges.txt."""
    model, folder = hf_clip
    from transformers import CLIPTokenizer

    only_json = tmp_path / "hf"
    model.save_pretrained(only_json)
    CLIPTokenizer.from_pretrained(str(folder)).save_pretrained(only_json)
    assert not (only_json / "vocab.json").exists() and (only_json / "tokenizer.json").is_file()
    a = load_checkpoint(import_hf(folder, tmp_path / "a")).tokenizer.encode_batch(TITLES)
    b = load_checkpoint(import_hf(only_json, tmp_path / "b")).tokenizer.encode_batch(TITLES)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


def test_hf_folder_with_pytorch_model_bin(hf_clip, tmp_path):
    """Older Hugging Face folders hold pytorch_model.bin: read with weights_only=True, same weights."""
    model, folder = hf_clip
    old = tmp_path / "hf-bin"
    shutil.copytree(folder, old)
    (old / "model.safetensors").unlink()
    torch.save(model.state_dict(), old / "pytorch_model.bin")
    a = load_checkpoint(import_hf(folder, tmp_path / "a")).model.state_dict()
    b = load_checkpoint(import_hf(old, tmp_path / "b")).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_openclip_import_matches_transformers(hf_clip, tmp_path, suffix):
    model, folder = hf_clip
    state = hf_to_openclip(model.state_dict())
    weights = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(weights))
    else:  # a training checkpoint as OpenCLIP writes it: tensors under "state_dict", DDP's "module." prefix
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)
    ck = load_checkpoint(import_openclip(weights, str(openclip_arch_json(tmp_path / "tiny.json")), tmp_path / "ours"))
    check_parity(ck, model, folder, f"OpenCLIP layout ({suffix})")


def test_openclip_named_architectures():
    b32 = openclip_model_config("ViT-B-32")
    assert b32.vision.activation == "gelu"  # OpenCLIP's plain configs use exact GELU
    quick = openclip_model_config("ViT-B-16-quickgelu")
    assert quick.vision.activation == quick.text.activation == "quick_gelu"  # OpenAI's weights
    assert quick.vision.patch_size == 16 and quick.text.context_length == 77
    assert openclip_model_config("ViT-L-14").embed_dim == get_size("clip-vit-l-14").model.embed_dim == 768


# --- refusals ------------------------------------------------------------------------------------------------
def _openclip_state(hf_clip) -> dict[str, torch.Tensor]:
    return hf_to_openclip(hf_clip[0].state_dict())


def test_refuses_unknown_architecture(tmp_path, hf_clip):
    save_file(_openclip_state(hf_clip), str(tmp_path / "w.safetensors"))
    with pytest.raises(ClipImportError, match=r"unknown OpenCLIP architecture 'ViT-H-99'; expected one of"):
        import_openclip(tmp_path / "w.safetensors", "ViT-H-99", tmp_path / "out")
    (tmp_path / "coca.json").write_text(json.dumps({"embed_dim": 8, "vision_cfg": {"attentional_pool": True}}))
    with pytest.raises(ClipImportError, match=r"unsupported OpenCLIP config keys \['vision_cfg.attentional_pool'\]"):
        import_openclip(tmp_path / "w.safetensors", str(tmp_path / "coca.json"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("ln_final.bias"), r"missing keys text_model.final_layer_norm.bias, extra keys none"),
        (lambda s: s.update(logit_bias=torch.zeros(1)), r"missing keys none, extra keys logit_bias"),
        (
            lambda s: s.update({"visual.proj": torch.zeros(48, 7)}),
            r"shape mismatch: visual_projection.weight \(7, 48\) gives \(7, 48\) for image.proj.weight, "
            rf"expected \({TINY_EMBED}, 48\)",
        ),
    ],
    ids=["missing", "extra", "shape"],
)
def test_refuses_bad_weights_and_writes_nothing(tmp_path, hf_clip, edit, match):
    state = _openclip_state(hf_clip)
    edit(state)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ClipImportError, match=match):
        import_openclip(tmp_path / "w.safetensors", str(openclip_arch_json(tmp_path / "a.json")), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.safetensors"]  # no output, no temp folder


class _Payload:
    """Anything that is not a tensor: weights_only refuses to unpickle it."""


def test_refuses_pickled_objects(tmp_path, hf_clip):
    state = {**_openclip_state(hf_clip)}
    torch.save({"state_dict": state, "hook": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ClipImportError, match=r"evil.pt: torch.load\(weights_only=True\) refused it .* never loaded"):
        import_openclip(tmp_path / "evil.pt", "ViT-B-32", tmp_path / "out")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_Payload(), protocol=2))
    with pytest.raises(ClipImportError, match=r"raw.pt: torch.load\(weights_only=True\) refused it"):
        import_openclip(tmp_path / "raw.pt", "ViT-B-32", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_non_clip_folder_and_existing_output(tmp_path, hf_clip):
    _, folder = hf_clip
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ClipImportError, match=r"model_type 'bert'; expected 'clip'"):
        import_hf(tmp_path / "bert", tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ClipImportError, match=r"busy already exists and is not empty"):
        import_hf(folder, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"


def test_refuses_folder_without_tokenizer(tmp_path, hf_clip):
    model, _ = hf_clip
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ClipImportError, match=r"has no tokenizer \(tokenizer.json, or vocab.json \+ merges.txt\)"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_clip_uses_the_shipped_vocabulary_for_a_folder_without_one(tmp_path, hf_clip, capsys):
    model, with_files = hf_clip
    model.save_pretrained(tmp_path / "hf")  # weights and config only
    assert main(["--hf", str(tmp_path / "hf"), "--tokenizer", "clip", "--out", str(tmp_path / "out")]) == 0
    assert main(["--hf", str(with_files), "--out", str(tmp_path / "ref")]) == 0
    capsys.readouterr()
    texts = ["a red zebra-striped mug", "Blue Shoes!", "x" * 300]
    ours, ref = load_checkpoint(tmp_path / "out").tokenizer, load_checkpoint(tmp_path / "ref").tokenizer
    assert ours.vocab_size == ref.vocab_size
    for a, b in zip(ours.encode_batch(texts), ref.encode_batch(texts), strict=True):
        np.testing.assert_array_equal(a, b)  # the same ids as the folder's own CLIP files


def test_tokenizer_clip_is_refused_for_another_vocabulary_size(tmp_path):
    small = random_clip(text={**TINY_TEXT, "vocab_size": 1000})
    small.save_pretrained(tmp_path / "hf")
    with pytest.raises(ClipImportError, match=r"CLIP's vocabulary has 49408 tokens but .*config.json gives the text "
                       r"tower 1000; expected the same"):  # fmt: skip
        import_hf(tmp_path / "hf", tmp_path / "out", tokenizer="clip")
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, hf_clip, capsys):
    _, folder = hf_clip
    assert main(["--hf", str(folder), "--out", str(tmp_path / "ours")]) == 0
    assert "imported tiny-clip" in capsys.readouterr().out
    assert read_config(tmp_path / "ours")["meta"]["source"] == "huggingface"
    assert main(["--openclip", str(tmp_path / "missing.safetensors"), "--arch", "ViT-B-32", "--out", "x"]) == 2
    assert "weights file" in capsys.readouterr().err


# --- base shape ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vit_b16_base_shape_import(tmp_path):
    """A randomly initialised CLIP ViT-B/16 (OpenAI's shapes: 224 px, 12+12 layers, 77 tokens) through both layouts."""
    text = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12}
    text |= {"num_attention_heads": 8, "max_position_embeddings": 77}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
    vision |= {"image_size": 224, "patch_size": 16}
    model = random_clip(text, vision, embed=512)
    folder = save_hf_folder(model, tmp_path / "hf")
    ck = load_checkpoint(import_hf(folder, tmp_path / "ours"))
    base = get_size("clip-vit-b-16")
    assert ck.model_cfg.vision == base.model.vision and ck.model_cfg.text == base.model.text
    check_parity(ck, model, folder, "ViT-B/16, HF layout")
    save_file(hf_to_openclip(model.state_dict()), str(tmp_path / "b16.safetensors"))
    ck2 = load_checkpoint(import_openclip(tmp_path / "b16.safetensors", "ViT-B-16-quickgelu", tmp_path / "oc"))
    check_parity(ck2, model, folder, "ViT-B/16, OpenCLIP layout")


def test_vocab_files_roundtrip(tmp_path):
    write_clip_vocab(tmp_path)
    assert len(json.loads((tmp_path / "vocab.json").read_text())) == 49408


# --- the switches ----------------------------------------------------------------------------------------------
def test_checkpoints_without_the_clip_fields_load_as_before(tiny_checkpoint, tmp_path):
    """A checkpoint written before the switches existed has none of their keys: it loads with our defaults
    (GELU, bidirectional text, [CLS] pooling, word-piece tokenizer) and computes the same embeddings."""
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    raw = json.loads((old / "config.json").read_text())
    for tower in ("vision", "text"):
        for key in ("activation", "causal", "pooling"):
            raw["model"][tower].pop(key, None)
    raw["preprocess"].pop("tokenizer")
    (old / "config.json").write_text(json.dumps(raw))
    a, b = load_checkpoint(tiny_checkpoint), load_checkpoint(old)
    assert b.model_cfg == a.model_cfg and b.pre_cfg == a.pre_cfg
    assert (b.model_cfg.text.activation, b.model_cfg.text.causal, b.model_cfg.text.pooling) == ("gelu", False, "cls")
    ids, mask = b.tokenizer.encode_batch(TITLES[:3])
    with torch.no_grad():
        ta = a.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
        tb = b.model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    assert torch.equal(ta, tb)


def test_switch_values_are_checked():
    tiny = get_size("tiny").model
    with pytest.raises(ValueError, match=r"text.activation='relu'; expected one of \['gelu', 'quick_gelu'\]"):
        dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, activation="relu")).validate()
    with pytest.raises(ValueError, match=r"text.pooling='mean'; expected one of \['cls', 'eot'\]"):
        dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, pooling="mean")).validate()
    with pytest.raises(ValueError, match=r"preprocess.tokenizer='bert'; expected one of"):
        PreprocessConfig.from_dict({**get_size("tiny").preprocess.to_dict(), "tokenizer": "bert"})


def test_causal_eot_text_tower_ignores_padding_and_later_tokens():
    """With causal attention and end-of-text pooling, the embedding depends only on the tokens up to the end
    token: changing the padding ids or the tokens after it changes nothing."""
    cfg = get_size("tiny").model
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, causal=True, pooling="eot"))
    torch.manual_seed(0)
    tower = MIMModel(cfg).eval()
    ids = torch.randint(4, cfg.text.vocab_size, (2, cfg.text.context_length))
    mask = torch.zeros_like(ids)
    mask[:, :5] = 1
    other = ids.clone()
    other[:, 5:] = 0
    with torch.no_grad():
        a, b = tower.encode_text(ids, mask), tower.encode_text(other, mask)
        c = tower.encode_text(ids, torch.ones_like(mask))  # pooled at the last position: a different embedding
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
