"""GPT: LlamaGen layout and parameter counts, 2-D RoPE, causality, KV cache, checkpoint loading, training."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest
import torch

from clusterar import ClusterarError
from clusterar.gpt import (
    GPT,
    GPT_PRESETS,
    GPTConfig,
    apply_rope,
    gpt_config_from_state_dict,
    gpt_preset,
    load_llamagen_gpt,
    param_breakdown,
    rope_table,
)
from clusterar.losses import token_ce
from clusterar.runtime import num_params

SPEC_DICTS = Path(__file__).resolve().parents[2] / "shared" / "llamagen-state-dicts.txt"

# SPEC §1: parameter counts and FFN hidden sizes of LlamaGen's presets.
SPEC_PARAMS = {
    "GPT-B": (110_888_448, 2048),
    "GPT-L": (342_910_976, 2816),
    "GPT-XL": (774_699_520, 3584),
    "GPT-XXL": (1_410_972_672, 4096),
    "GPT-1B": (1_199_616_000, 5632),
    "GPT-3B": (3_096_659_200, 8704),
}


def tiny(**kw) -> GPTConfig:
    """Small and dropout-free, so outputs are deterministic in train mode too."""
    base = dict(
        vocab_size=64, grid_size=4, class_dropout=0.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0
    )
    base.update(kw)
    return gpt_preset("tiny", **base)


def random_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A model with a non-zero head (a fresh one predicts all-zero logits, which hides every bug)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


def meta_model(cfg: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_llamagen_param_counts(name):
    model = meta_model(gpt_preset(name))
    params, hidden = SPEC_PARAMS[name]
    assert num_params(model) == params
    assert model.config.ffn_hidden == hidden
    assert model.layers[0].feed_forward.w1.weight.shape == (hidden, model.config.dim)
    assert param_breakdown(model)["total"] == params


def test_reference_file_configs():
    """Every preset row of llamagen-state-dicts.txt: params, head_dim, FFN size, RoPE table shape."""
    if not SPEC_DICTS.is_file():
        pytest.skip(f"{SPEC_DICTS} not present")
    rows = re.findall(
        r"^(GPT-\w+)\s+block=(\d+) dim=(\d+) n_layer=(\d+) n_head=(\d+) head_dim=(\d+) ffn_hidden=(\d+) "
        r"params=([\d,]+) freqs_cis=\((\d+), (\d+), 2\)",
        SPEC_DICTS.read_text(),
        re.M,
    )
    checked = 0
    for name, block, dim, n_layer, n_head, head_dim, ffn, params, f0, f1 in rows:
        if name not in GPT_PRESETS:
            continue
        cfg = gpt_preset(name, grid_size=math.isqrt(int(block)))
        assert (cfg.dim, cfg.n_layer, cfg.n_head) == (int(dim), int(n_layer), int(n_head))
        assert (cfg.head_dim, cfg.ffn_hidden) == (int(head_dim), int(ffn))
        model = meta_model(cfg)
        assert num_params(model) == int(params.replace(",", ""))
        assert tuple(model.freqs_cis.shape) == (int(f0), int(f1), 2)
        checked += 1
    assert checked == 12


def test_gpt_b_state_dict_matches_llamagen():
    if not SPEC_DICTS.is_file():
        pytest.skip(f"{SPEC_DICTS} not present")
    text = SPEC_DICTS.read_text().split("=== GPT-B state dict")[1].split("===")[0]
    ref = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+) \(([\d, ]*)\) torch\.float32$", line.strip())
        if m:
            ref[m.group(1)] = tuple(int(s) for s in m.group(2).split(",") if s.strip())
    n_keys = int(re.search(r"num keys (\d+)", text).group(1))
    sd = meta_model(gpt_preset("GPT-B")).state_dict()
    assert len(sd) == n_keys == 88
    assert all(v.dtype == torch.float32 for v in sd.values())
    for key, shape in ref.items():  # the file lists layer 0 and the non-layer keys
        assert tuple(sd[key].shape) == shape, key
    for i in range(12):  # every layer has layer 0's keys and shapes
        for key, shape in ref.items():
            if key.startswith("layers.0."):
                assert tuple(sd[key.replace("layers.0.", f"layers.{i}.")].shape) == shape
    assert "freqs_cis" not in sd and "causal_mask" not in sd


def test_init_and_buffers():
    torch.manual_seed(0)
    model = GPT(gpt_preset("cpu-s"))
    assert torch.all(model.output.weight == 0)
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 1e-3
    assert model.cls_embedding.embedding_table.weight.shape == (11, 128)
    assert torch.all(model.norm.weight == 1)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    model.setup_cache(2)
    assert set(model.state_dict()) == set(GPT(gpt_preset("cpu-s")).state_dict())  # caches not saved


def test_presets_and_config():
    cfg = gpt_preset("GPT-L", vocab_size=512)  # CTF stage 1: coarse labels in and out
    assert cfg.vocab_size == cfg.input_vocab_size == 512
    cfg = gpt_preset("GPT-L", input_vocab_size=512, causal=False)  # CTF stage 2
    assert (cfg.input_vocab_size, cfg.vocab_size, cfg.causal) == (512, 16384, False)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ClusterarError, match="unknown GPT preset"):
        gpt_preset("GPT-Z")
    with pytest.raises(ClusterarError, match="unknown GPT config fields"):
        GPTConfig.from_dict({"dims": 3})
    with pytest.raises(ClusterarError, match="divisible"):
        GPTConfig(dim=100, n_head=3)
    # CTF stage 1 needs 2 * (K - M) * dim fewer parameters than the baseline.
    base = param_breakdown(meta_model(gpt_preset("GPT-B")))
    coarse = param_breakdown(meta_model(gpt_preset("GPT-B", vocab_size=512)))
    assert base["body"] == coarse["body"]
    assert base["total"] - coarse["total"] == 2 * (16384 - 512) * 768


# ----------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("head_dim,grid", [(64, 16), (100, 24), (16, 3)])
def test_rope_table_layout(head_dim, grid):
    table = rope_table(grid, head_dim, 10000.0, cls_token_num=1)
    assert table.shape == (1 + grid * grid, head_dim // 2, 2)
    assert torch.all(table[0] == 0)  # class position: cos = sin = 0
    q = head_dim // 4
    for r, c in [(0, 0), (0, grid - 1), (grid - 1, 0), (1, 2 % grid), (grid - 1, grid - 1)]:
        p = 1 + r * grid + c
        for i in range(q):
            f = 10000.0 ** (-(2 * i) / (head_dim / 2))
            for part, coord in ((i, r), (q + i, c)):
                want = torch.tensor([math.cos(coord * f), math.sin(coord * f)])
                torch.testing.assert_close(table[p, part], want, atol=2e-5, rtol=0)


def test_rope_rotates_adjacent_pairs():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    a, b = 0.3, -1.1
    freqs = torch.tensor([[[math.cos(a), math.sin(a)], [math.cos(b), math.sin(b)]]])  # [S=1, 2, 2]
    want = [
        1 * math.cos(a) - 2 * math.sin(a),
        2 * math.cos(a) + 1 * math.sin(a),
        3 * math.cos(b) - 4 * math.sin(b),
        4 * math.cos(b) + 3 * math.sin(b),
    ]
    torch.testing.assert_close(apply_rope(x, freqs).flatten(), torch.tensor(want))
    assert torch.all(apply_rope(x, torch.zeros(1, 2, 2)) == 0)  # the class position's q and k vanish


# ----------------------------------------------------------------------------- forward semantics


def test_zero_head_gives_uniform_first_loss():
    cfg = gpt_preset("tiny")
    torch.manual_seed(0)
    model = GPT(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    cond = torch.tensor([0, 5, 9])
    logits = model(idx[:, :-1], cond)
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size) and logits.dtype == torch.float32
    assert torch.all(logits == 0)
    assert abs(token_ce(logits, idx).item() - math.log(cfg.vocab_size)) < 1e-5


def test_causal_and_bidirectional_dependence():
    for causal in (True, False):
        cfg = tiny(causal=causal)
        model = random_model(cfg)
        n = cfg.seq_len - 1 if causal else cfg.seq_len
        idx = torch.randint(0, cfg.input_vocab_size, (2, n), generator=torch.Generator().manual_seed(1))
        cond = torch.tensor([1, 2])
        base = model(idx, cond)
        assert base.shape == (2, cfg.seq_len, cfg.vocab_size)
        for j in (0, 5, n - 1):
            changed = idx.clone()
            changed[:, j] = (changed[:, j] + 1) % cfg.input_vocab_size
            diff = (model(changed, cond) - base).abs().amax(dim=(0, 2))  # per output position
            if causal:  # input token j sits at position j+1 and first shows in output j+1
                assert torch.all(diff[: j + 1] == 0), j
                assert diff[j + 1] > 1e-4
            else:
                assert torch.all(diff > 1e-6), j
    with pytest.raises(ClusterarError, match=r"tokens\[:, :-1\]"):
        random_model(tiny())(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_class_dropout_only_in_training_and_reproducible():
    cfg = tiny(class_dropout=0.5)
    model = random_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (64, 3))
    cond = torch.full((64,), 3)
    null = model(idx, torch.full((64,), cfg.null_class))
    assert torch.equal(model(idx, cond), model(idx, cond))  # eval: never dropped
    model.train()
    a = model(idx, cond, generator=torch.Generator().manual_seed(7))
    b = model(idx, cond, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    dropped = torch.isclose(a, null, atol=1e-6).flatten(1).all(1)
    assert 10 < dropped.sum() < 54  # about half became the null class
    # The same draw made outside the model (how a torch.compile'd trainer does it).
    mask = model.class_drop_mask(64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(mask, dropped)
    assert torch.equal(model(idx, cond, class_drop=mask), a)
    model.eval()  # an explicit mask applies in any mode
    assert torch.equal(model(idx, cond, class_drop=mask), a)


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("cfg_batch", [False, True])
def test_kv_cache_matches_full_forward(cfg_batch):
    cfg = tiny(grid_size=5)
    model = random_model(cfg)
    labels = torch.tensor([0, 3, 7])
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(2))
    if cfg_batch:  # classifier-free guidance: [cond; null], same tokens in both halves
        labels = torch.cat([labels, torch.full_like(labels, cfg.null_class)])
        idx = torch.cat([idx, idx])
    b = labels.shape[0]
    with torch.no_grad():
        full = model(idx[:, :-1], labels)
        model.setup_cache(max_batch=8)  # larger than the batch: the cache is sliced
        steps = [model.prefill(labels)[:, -1]]
        for i in range(cfg.seq_len - 1):
            pos = torch.tensor([cfg.cls_token_num + i])
            steps.append(model.decode_step(idx[:, i : i + 1], pos)[:, -1])
        cached = torch.stack(steps, dim=1)
    assert cached.shape == full.shape == (b, cfg.seq_len, cfg.vocab_size)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    if cfg_batch:  # the null half really differs from the conditional one
        assert (cached[:3] - cached[3:]).abs().max() > 1e-3
    model.clear_cache()
    with pytest.raises(ClusterarError, match="setup_cache"):
        model.prefill(labels)


def test_attention_over_the_filled_prefix_equals_the_whole_static_cache():
    """decode_step(length=L) reads only the cache's first L positions (what the eager sampler does, to
    skip the empty rest); the whole static cache (what a compiled step reads) gives the same logits."""
    cfg = tiny(grid_size=5)
    model = random_model(cfg)
    labels = torch.tensor([0, 3, 7, cfg.null_class])
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.setup_cache(max_batch=4)
        model.prefill(labels)
        whole = [model.decode_step(idx[:, i : i + 1], cfg.cls_token_num + i) for i in range(cfg.seq_len)]
        model.prefill(labels)
        prefix = [
            model.decode_step(idx[:, i : i + 1], cfg.cls_token_num + i, cfg.cls_token_num + i + 1)
            for i in range(cfg.seq_len)
        ]
    torch.testing.assert_close(torch.cat(prefix, 1), torch.cat(whole, 1), atol=1e-5, rtol=0)


def test_kv_cache_refusals():
    model = random_model(tiny())
    model.setup_cache(max_batch=2)
    with pytest.raises(ClusterarError, match="max_batch"):
        model.prefill(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ClusterarError, match="bidirectional"):
        random_model(tiny(causal=False)).setup_cache(2)


# ----------------------------------------------------------------------------- checkpoints


def _wrappers(sd: dict, other: dict) -> dict[str, object]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    args = argparse.Namespace(gpt_model="GPT-B", image_size=256, lr=1e-4)
    return {
        "bare": sd,
        "model": {"model": sd},
        "module": {"module": {f"module.{k}": v for k, v in sd.items()}},
        "state_dict": {"state_dict": sd},
        "training": {"model": sd, "optimizer": opt.state_dict(), "steps": 100, "args": args, "ema": other},
    }


def test_llamagen_checkpoint_wrappers(tmp_path):
    cfg = tiny()
    model, other = random_model(cfg, seed=0), random_model(cfg, seed=1)
    idx, cond = torch.randint(0, cfg.vocab_size, (2, 7)), torch.tensor([1, 4])
    want, want_ema = model(idx, cond), other(idx, cond)
    for name, obj in _wrappers(model.state_dict(), other.state_dict()).items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        loaded = load_llamagen_gpt(path, cfg)
        assert not loaded.training
        assert torch.equal(loaded(idx, cond), want), name
    ema = GPT.from_checkpoint(tmp_path / "training.pt", cfg, ema=True)
    assert torch.equal(ema(idx, cond), want_ema)
    # No config: read off the shapes (n_head from the preset of the same width).
    inferred = load_llamagen_gpt(tmp_path / "model.pt", grid_size=4)
    assert _arch(inferred.config) == _arch(cfg)
    assert torch.equal(inferred(idx, cond), want)
    with pytest.raises(ClusterarError, match="no 'ema'"):
        load_llamagen_gpt(tmp_path / "model.pt", cfg, ema=True)


def _arch(c: GPTConfig) -> tuple:
    """What the weights determine (plus grid_size and causal); dropout rates are not stored."""
    return (
        c.dim, c.n_layer, c.n_head, c.vocab_size, c.input_vocab_size, c.num_classes, c.ffn_hidden,
        c.grid_size, c.causal,
    )  # fmt: skip


def test_llamagen_checkpoint_mismatch(tmp_path):
    cfg = tiny()
    sd = random_model(cfg).state_dict()
    missing = {k: v for k, v in sd.items() if k != "layers.1.ffn_norm.weight"}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(ClusterarError, match=r"missing keys: layers\.1\.ffn_norm\.weight"):
        load_llamagen_gpt(tmp_path / "missing.pt", cfg)
    torch.save(
        {**sd, "layers.2.attention.wqkv.weight": sd["layers.0.attention.wqkv.weight"]}, tmp_path / "x.pt"
    )
    with pytest.raises(ClusterarError, match=r"unexpected keys: layers\.2\.attention\.wqkv\.weight"):
        load_llamagen_gpt(tmp_path / "x.pt", cfg)
    with pytest.raises(ClusterarError, match="shape mismatches: output.weight"):
        load_llamagen_gpt(tmp_path / "x.pt", tiny(vocab_size=32, input_vocab_size=64))


def test_config_from_state_dict_llamagen_shapes():
    sd = meta_model(gpt_preset("GPT-3B")).state_dict()
    cfg = gpt_config_from_state_dict(sd, grid_size=24)
    ref = gpt_preset("GPT-3B", grid_size=24)
    assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.ffn_hidden, cfg.num_classes) == (
        ref.dim,
        ref.n_layer,
        ref.n_head,
        ref.ffn_hidden,
        ref.num_classes,
    )
    with pytest.raises(ClusterarError, match="pass n_head"):
        gpt_config_from_state_dict(meta_model(gpt_preset("tiny", dim=96, n_head=3)).state_dict())


# ----------------------------------------------------------------------------- training


def test_tiny_model_overfits_fixed_batch():
    cfg = gpt_preset("tiny", class_dropout=0.0, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    cond = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = token_ce(model(idx[:, :-1], cond), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(cfg.vocab_size)) < 1e-5
    assert losses[-1] < 0.1 * math.log(cfg.vocab_size), losses[-1]
