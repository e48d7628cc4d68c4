"""VQ tokenizer: LlamaGen layout, strict loading, encode/decode, training, resume."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from clusterar import ClusterarError
from clusterar.checkpoints import load_checkpoint, load_state_strict, load_torch_weights
from clusterar.runtime import num_params
from clusterar.tokenizer import (
    VQConfig,
    VQModel,
    load_tokenizer,
    save_tokenizer,
    vq_config_from_state_dict,
    vq_preset,
)

SPEC_DICTS = Path(__file__).resolve().parents[2] / "shared" / "llamagen-state-dicts.txt"


def _reference_vq16() -> dict[str, tuple[int, ...]]:
    """Every key and shape of LlamaGen's VQ-16, as listed in shared/llamagen-state-dicts.txt (SPEC.md §2)."""
    text = SPEC_DICTS.read_text().split("=== VQ-16 state dict")[1]
    ref = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+) \(([\d, ]*)\)$", line.strip())
        if m:
            ref[m.group(1)] = tuple(int(s) for s in m.group(2).split(",") if s.strip())
    return ref


def tiny_cfg(**kw) -> VQConfig:
    base = dict(
        ch=32,
        ch_mult=(1, 2),
        z_channels=32,
        codebook_size=64,
        codebook_dim=4,
        enc_res_blocks=1,
        dec_res_blocks=1,
    )
    base.update(kw)
    return VQConfig(**base)


@pytest.fixture(scope="module")
def vq16() -> VQModel:
    return VQModel(vq_preset("vq-16"))


@pytest.mark.skipif(not SPEC_DICTS.exists(), reason="shared/llamagen-state-dicts.txt not beside the checkout")
def test_vq16_keys_and_shapes_match_llamagen(vq16):
    ref = _reference_vq16()
    ours = {k: tuple(v.shape) for k, v in vq16.state_dict().items()}
    assert len(ref) == 344
    assert set(ours) == set(ref)
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}


def test_vq_param_counts(vq16):
    assert num_params(vq16) == 71_883_403  # SPEC.md §2: 71.9M
    assert num_params(VQModel(vq_preset("vq-8"))) == 70_109_835


def test_vq16_grid_and_llamagen_file_loads_strictly(vq16, tmp_path):
    # A LlamaGen-style file: {"model": state_dict}, plus a training checkpoint with argparse.Namespace args.
    torch.save({"model": vq16.state_dict()}, tmp_path / "vq_ds16_c2i.pt")
    torch.save(
        {"model": vq16.state_dict(), "steps": 3, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "train.pt"
    )
    for name in ("vq_ds16_c2i.pt", "train.pt"):
        loaded = load_tokenizer(tmp_path / name)
        assert loaded.config.ch_mult == (1, 1, 2, 2, 4) and loaded.config.downsample == 16
        assert loaded.fingerprint() == vq16.fingerprint()
    assert vq_config_from_state_dict(vq16.state_dict()) == vq16.config


def test_partial_checkpoint_is_a_clear_error(vq16, tmp_path):
    state = vq16.state_dict()
    state.pop("quantize.codebook_used")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ClusterarError, match=r"missing keys: quantize.codebook_used") as e:
        load_state_strict(vq16, state, source="x.pt")
    assert "unexpected keys: extra.weight" in str(e.value)
    torch.save({"optimizer": {}}, tmp_path / "bad.pt")
    with pytest.raises(ClusterarError, match="bad.pt"):
        load_torch_weights(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ClusterarError, match="junk.pt"):
        load_tokenizer(tmp_path / "junk.pt")


def test_encode_decode_shapes_and_roundtrip():
    torch.manual_seed(0)
    model = VQModel(tiny_cfg()).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ids = model.encode(x)
    assert ids.shape == (3, 8, 8) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    img = model.decode(ids)
    assert img.shape == (3, 3, 16, 16)
    assert img.min() >= -1 and img.max() <= 1
    # the quantised latents of the decoded ids are exactly the codes: encode(decode) path through the codebook
    recon, ids2, _ = model(x)
    assert torch.equal(ids, ids2)
    assert torch.allclose(model.decode(ids), recon.clamp(-1, 1), atol=1e-5)
    # flattened square grids are accepted
    assert torch.equal(model.decode(ids.flatten(1)), img)


def test_codes_are_unit_norm_and_lookup_is_nearest():
    model = VQModel(tiny_cfg())
    codes = model.quantize.codes()
    assert torch.allclose(codes.norm(dim=1), torch.ones(64), atol=1e-6)
    z = torch.nn.functional.normalize(torch.randn(50, 4), dim=1)
    ids = model.quantize.nearest(z)
    assert torch.equal(ids, (z @ codes.t()).argmax(1))  # cosine lookup


def test_bad_inputs():
    model = VQModel(tiny_cfg())
    with pytest.raises(ClusterarError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ClusterarError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 2, 2), 64))
    with pytest.raises(ClusterarError, match="not divisible by norm_groups"):
        VQConfig(ch=48)
    with pytest.raises(ClusterarError, match="unknown tokenizer preset"):
        vq_preset("vq-32")


def test_save_load_roundtrip(tmp_path):
    model = VQModel(tiny_cfg())
    save_tokenizer(model, tmp_path / "tok.safetensors", info={"note": "x"})
    again = load_tokenizer(tmp_path / "tok.safetensors")
    assert again.config == model.config
    assert again.fingerprint() == model.fingerprint()
    with pytest.raises(ClusterarError, match="without tokenizer.safetensors"):
        load_tokenizer(tmp_path)


def _train_cfg(**kw):
    from clusterar.train import TokenizerTrainConfig

    base = dict(
        data="digits",
        preset="tiny",
        image_size=16,
        codebook_size=64,
        steps=4,
        batch_size=8,
        lr=1e-3,
        warmup=1,
        restart_every=2,
        eval_every=1000,
        ckpt_every=2,
        log_every=1,
        device="cpu",
    )
    base.update(kw)
    return TokenizerTrainConfig(**base)


def test_training_resume_is_bit_exact(tmp_path):
    """2 steps, stop, resume 2 steps == 4 straight steps, including a dead-code restart at step 2 and 4."""
    from clusterar.train import train_tokenizer

    train_tokenizer(_train_cfg(), tmp_path / "straight", progress=False)
    assert train_tokenizer(_train_cfg(), tmp_path / "split", progress=False, stop_at=2) is None
    # continuing needs --resume, and the same settings except the step budget
    with pytest.raises(ClusterarError, match="--resume"):
        train_tokenizer(_train_cfg(), tmp_path / "split", progress=False)
    with pytest.raises(ClusterarError, match="settings differ"):
        train_tokenizer(_train_cfg(lr=5e-4), tmp_path / "split", resume=True, progress=False)
    train_tokenizer(_train_cfg(), tmp_path / "split", resume=True, progress=False)
    a = load_tokenizer(tmp_path / "straight")
    b = load_tokenizer(tmp_path / "split")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    meta, _ = load_checkpoint(tmp_path / "split" / "checkpoint.safetensors", VQModel(a.config))
    assert meta["step"] == 4
    for name in ("recon.png", "curves.png", "eval.json", "config.json"):
        assert (tmp_path / "split" / name).exists()


def test_a_finished_tokenizer_run_is_extended_with_the_schedule_stated(tmp_path, capsys):
    from clusterar.train import train_tokenizer

    run = tmp_path / "run"
    train_tokenizer(_train_cfg(), run, progress=False)
    capsys.readouterr()
    train_tokenizer(_train_cfg(steps=6), run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"resuming {run} at step 4 of 6 (the budget was 4 steps; the cosine schedule is stretched" in err
    meta, _ = load_checkpoint(run / "checkpoint.safetensors", VQModel(load_tokenizer(run).config))
    assert meta["step"] == 6
    steps = [
        json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if "loss" in line
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no step logged twice, none missing at the end
    with pytest.raises(ClusterarError, match="already at step 6; give a larger --steps"):
        train_tokenizer(_train_cfg(steps=5), run, resume=True, progress=False)


def test_tiny_tokenizer_learns(tmp_path):
    """A short run on real digits must beat the untrained model's reconstruction by a wide margin."""
    from clusterar.data import load_dataset
    from clusterar.train import evaluate_tokenizer, train_tokenizer

    ev = train_tokenizer(
        _train_cfg(steps=120, batch_size=32, lr=3e-3, restart_every=20), tmp_path / "t", progress=False
    )
    torch.manual_seed(0)
    untrained = evaluate_tokenizer(
        VQModel(load_tokenizer(tmp_path / "t").config), load_dataset("digits", "val", 16), torch.device("cpu")
    )
    assert ev["psnr"] > untrained["psnr"] + 5
    assert ev["usage"] > 0.3
