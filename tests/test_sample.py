"""Sampling: KV-cache vs naive decoding, filtering, guidance, LlamaGen files, CTF two stages, IAR id
mapping, pipeline files and their checks, and the `clusterar sample` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterar import ClusterarError
from clusterar.cli import main
from clusterar.clusters import CodebookClusters, unmap_tokens
from clusterar.data import to_uint8
from clusterar.gpt import GPT, export_llamagen, gpt_preset, load_llamagen_gpt
from clusterar.model_file import ModelInfo, save_model
from clusterar.sample import (
    Pipeline,
    SampleSettings,
    auto_compile,
    draw,
    draw_in_cluster,
    filter_top_k,
    filter_top_p,
    generate,
    guide,
    make_labels,
    refine,
    sample_logits,
    sample_to_folder,
    write_ctf_pipeline,
)
from clusterar.tokenizer import save_tokenizer

K, M, CLASSES = 512, 16, 10  # tiny tokenizer codes, clusters, classes


pytestmark = pytest.mark.usefixtures("one_thread")


def random_gpt(seed: int = 0, **kw) -> GPT:
    """A tiny GPT with a non-zero head (a fresh one predicts uniform logits, which hides every bug)."""
    torch.manual_seed(seed)
    model = GPT(gpt_preset("tiny", **kw))
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model.eval()


def cfg_of(model: GPT) -> dict:
    return model.config.to_dict()


@pytest.fixture(scope="module")
def parts(make_tokenizer, tmp_path_factory):
    """A random tiny tokenizer (8x8 tokens on 32x32) and two clusterings of its codebook, saved to files."""
    d = tmp_path_factory.mktemp("parts")
    tok = make_tokenizer(0)
    save_tokenizer(tok, d / "tokenizer.safetensors")
    codebook = tok.quantize.embedding.weight.detach()
    gen = torch.Generator().manual_seed(1)
    balanced = CodebookClusters.from_labels(torch.randperm(K, generator=gen) % M, codebook, "balanced", M)
    kmeans = CodebookClusters.from_labels(torch.randint(0, M, (K,), generator=gen), codebook, "kmeans", M)
    balanced.save(d / "balanced.safetensors")
    kmeans.save(d / "kmeans.safetensors")
    return {
        "dir": d,
        "tok": tok,
        "tok_path": d / "tokenizer.safetensors",
        "balanced": CodebookClusters.load(d / "balanced.safetensors"),
        "kmeans": CodebookClusters.load(d / "kmeans.safetensors"),
    }


def run_info(parts: dict, method: str, key: str | None = None, **kw) -> dict:
    """The metadata `clusterar train` writes into model.safetensors (the run contract); `key` names the
    clusters of `parts` the model was trained with."""
    cl = parts[key] if key else None
    info = {
        "method": method,
        "tokenizer": str(parts["tok_path"].resolve()),
        "tokenizer_fingerprint": parts["tok"].fingerprint(),
        "clusters": str((parts["dir"] / f"{key}.safetensors").resolve()) if key else None,
        "clusters_fingerprint": cl.fingerprint() if cl else None,
        "id_space": {"iar": "rearranged", "ctf-coarse": "coarse"}.get(method, "original"),
        "restrict_to_cluster": False,
        "step": 7,
        "epoch": 1.0,
        "image_size": 32,
        "grid": [8, 8],
        "dataset": "test",
        "num_classes": CLASSES,
        "class_names": [str(i) for i in range(CLASSES)],
    }
    info.update(kw)
    return info


def write_run(path: Path, model: GPT, info: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_model(path / "model.safetensors", model, ModelInfo.from_dict(info))
    return path


@pytest.fixture(scope="module")
def runs(parts):
    d = parts["dir"]
    out = {
        "baseline": write_run(d / "baseline", random_gpt(1), run_info(parts, "baseline")),
        "iar": write_run(d / "iar", random_gpt(2), run_info(parts, "iar", "balanced")),
        "coarse": write_run(
            d / "coarse", random_gpt(3, vocab_size=M), run_info(parts, "ctf-coarse", "kmeans")
        ),
        "refiner": write_run(
            d / "refiner",
            random_gpt(4, input_vocab_size=M, causal=False),
            run_info(parts, "ctf-refiner", "kmeans"),
        ),
        "refiner-restricted": write_run(
            d / "refiner-restricted",
            random_gpt(4, input_vocab_size=M, causal=False),
            run_info(parts, "ctf-refiner", "kmeans", restrict_to_cluster=True),
        ),
    }
    return out


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_generate_equals_naive(cfg_scale):
    model = random_gpt(5, grid_size=4)
    labels = torch.tensor([0, 3, 9])
    kw = dict(cfg_scale=cfg_scale, temperature=1.0, return_logits=True)
    ids_c, logits_c = generate(model, labels, generator=torch.Generator().manual_seed(1), **kw)
    ids_n, logits_n = generate(
        model, labels, generator=torch.Generator().manual_seed(1), use_cache=False, **kw
    )
    assert ids_c.shape == (3, 16) and ids_c.dtype == torch.long
    assert torch.equal(ids_c, ids_n)
    assert logits_c.shape == (3, 16, K)
    torch.testing.assert_close(logits_c, logits_n, atol=1e-4, rtol=1e-4)
    # the cache stays allocated and is reused by the next call: same draw again
    assert torch.equal(
        ids_c, generate(model, labels, generator=torch.Generator().manual_seed(1), cfg_scale=cfg_scale)
    )


def test_guidance_is_applied_on_raw_logits():
    model = random_gpt(6, grid_size=4)
    labels = torch.tensor([1, 2])
    ids, logits = generate(
        model, labels, cfg_scale=3.0, generator=torch.Generator().manual_seed(0), return_logits=True
    )
    with torch.no_grad():
        c = model(ids[:, :-1], labels)
        u = model(ids[:, :-1], torch.full_like(labels, CLASSES))
    torch.testing.assert_close(logits, u + 3.0 * (c - u), atol=1e-4, rtol=1e-4)


def test_cfg_scale_one_equals_conditional_sampling():
    model = random_gpt(7, grid_size=4)
    labels = torch.tensor([4, 5, 6])
    cond, lc = generate(
        model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(3), return_logits=True
    )
    both, lb = generate(
        model,
        labels,
        cfg_scale=1.0,
        null_batch=True,
        generator=torch.Generator().manual_seed(3),
        return_logits=True,
    )
    assert torch.equal(cond, both)
    torch.testing.assert_close(lc, lb, atol=1e-5, rtol=1e-5)
    guided = generate(model, labels, cfg_scale=4.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(cond, guided)  # guidance really changes the draw


def test_top_k_one_is_greedy():
    model = random_gpt(8, grid_size=4)
    labels = torch.tensor([0, 7])
    a = generate(model, labels, cfg_scale=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    b = generate(model, labels, cfg_scale=2.0, top_k=1, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    # greedy by hand: argmax of the guided logits, one full forward pass per token
    null = torch.full_like(labels, CLASSES)
    ids = torch.empty(2, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(16):
            c, u = model(ids, labels)[:, -1], model(ids, null)[:, -1]
            ids = torch.cat([ids, (u + 2.0 * (c - u)).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(a, ids)


def test_top_p_and_top_k_on_a_hand_made_distribution():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    inf = float("-inf")
    kept = filter_top_p(logits, 0.75)  # 0.5, then 0.3 crosses 0.75: keep both
    assert torch.equal(kept.isfinite(), torch.tensor([[False, True, False, True]]))
    assert torch.equal(kept[kept.isfinite()], logits[kept.isfinite()])
    assert torch.equal(filter_top_p(logits, 0.85).isfinite(), torch.tensor([[True, True, False, True]]))
    assert torch.equal(filter_top_p(logits, 0.1).isfinite(), torch.tensor([[False, True, False, False]]))
    assert torch.equal(filter_top_p(logits, 1.0), logits)
    assert torch.equal(filter_top_k(logits, 2), torch.tensor([[inf, logits[0, 1], inf, logits[0, 3]]]))
    assert torch.equal(filter_top_k(logits, 0), logits)
    # draws only ever come from the nucleus, in proportion to the renormalised probabilities
    many = logits.expand(20000, 4)
    draws = sample_logits(many, top_p=0.75, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / 20000
    assert counts[0] == counts[2] == 0
    assert abs(counts[1].item() - 0.5 / 0.8) < 0.02
    with pytest.raises(ClusterarError, match="top-p"):
        SampleSettings(top_p=0.0).check()
    with pytest.raises(ClusterarError, match="temperature"):
        SampleSettings(temperature=0).check()


def test_draw_is_exact_categorical_sampling():
    """Inverse-CDF draws: frequencies match the (unnormalised) probabilities, zero entries never come up,
    a seed repeats its draws, and every row draws on its own."""
    probs = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    many = probs.repeat(20000, 1)
    ids = draw(many, torch.Generator().manual_seed(0)).view(20000, 2)
    first = torch.bincount(ids[:, 0], minlength=6).float() / 20000
    second = torch.bincount(ids[:, 1], minlength=6).float() / 20000
    assert first[[0, 2, 5]].sum() == 0 and second[1:5].sum() == 0
    assert torch.allclose(first[[1, 3, 4]], torch.tensor([0.5, 0.25, 0.25]), atol=0.015)
    assert abs(second[5].item() - 0.75) < 0.015
    again = draw(many, torch.Generator().manual_seed(0)).view(20000, 2)
    assert torch.equal(ids, again)
    assert not torch.equal(ids, draw(many, torch.Generator().manual_seed(1)).view(20000, 2))
    one_hot = torch.zeros(3, 4096)
    one_hot[torch.arange(3), torch.tensor([0, 17, 4095])] = 1.0  # the first and last entries too
    assert draw(one_hot, torch.Generator().manual_seed(3)).tolist() == [0, 17, 4095]


def test_compiled_decode_step_traces_whole_and_matches():
    """The decode step compiles as ONE graph (fullgraph=True); backend "eager" keeps the check fast on a
    CPU, the real `--compile` (inductor, reduce-overhead) is exercised on a GPU by the benchmark."""
    torch._dynamo.reset()
    model = random_gpt(9, grid_size=4)
    labels = torch.tensor([2, 3])
    ref = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(5))
    got = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(5), compile="eager")
    assert torch.equal(ref, got)


def step_by_step(model: GPT, labels, cfg_scale, generator, top_k=0, top_p=1.0, draw_order=None):
    """The sampler as it was before the whole step was one function: the model's decode step, then
    guidance, the draw order, filtering and a draw from `generator`, one step at a time on the host."""
    c, b = model.config, labels.shape[0]
    cond = torch.cat([labels, torch.full_like(labels, c.null_class)])
    model.setup_cache(2 * b, dtype=torch.float32, device=labels.device)
    out = torch.empty(b, c.seq_len, dtype=torch.long)

    def pick(logits):
        logits = guide(logits, cfg_scale)
        logits = logits[..., draw_order] if draw_order is not None else logits
        tok = sample_logits(logits, top_k=top_k, top_p=top_p, generator=generator)
        return draw_order[tok] if draw_order is not None else tok

    tok = pick(model.prefill(cond)[:, -1])
    out[:, 0] = tok
    for i in range(1, c.seq_len):
        p = c.cls_token_num + i - 1
        tok = pick(model.decode_step(torch.cat([tok, tok])[:, None], torch.tensor([p]))[:, -1])
        out[:, i] = tok
    return out


@pytest.mark.parametrize("compile", [False, "eager"])
def test_whole_token_step_draws_what_the_step_by_step_loop_drew(compile):
    """`generate` draws every step's uniform numbers at once and runs guidance, the IAR draw order,
    filtering and the draw inside one function (`token_step`), which compiles as one graph
    (fullgraph=True: no host synchronisation inside): the ids equal the step-by-step loop's under the
    same seed, for plain, filtered and IAR-ordered draws."""
    torch._dynamo.reset()
    model = random_gpt(3, grid_size=4)
    labels = torch.tensor([0, 4, 7])
    order = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    for kw in ({}, {"top_k": 50, "top_p": 0.9}, {"draw_order": order}):
        ref = step_by_step(model, labels, 1.5, torch.Generator().manual_seed(11), **kw)
        model.clear_cache()
        got = generate(
            model, labels, cfg_scale=1.5, generator=torch.Generator().manual_seed(11), compile=compile, **kw
        )
        assert torch.equal(ref, got), kw


def test_compiled_refiner_matches_eager():
    """CTF stage 2 compiled (one graph: the refiner's forward and the guidance) draws the eager ids."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    refiner = GPT(gpt_preset("tiny", grid_size=4, causal=False, input_vocab_size=16)).eval()
    torch.nn.init.normal_(refiner.output.weight, std=0.5)
    coarse = torch.randint(0, 16, (3, 16))
    labels = torch.tensor([1, 2, 3])
    for cfg in (1.0, 2.0):
        a = refine(refiner, coarse, labels, cfg_scale=cfg, generator=torch.Generator().manual_seed(2))
        b = refine(
            refiner,
            coarse,
            labels,
            cfg_scale=cfg,
            generator=torch.Generator().manual_seed(2),
            compile="eager",
        )
        assert torch.equal(a, b)


def test_compile_defaults_to_cuda_only():
    """Users sampling on a GPU get the compiled step without a flag; a CPU stays eager."""
    assert auto_compile(None, torch.device("cuda")) is True
    assert auto_compile(None, torch.device("cpu")) is False
    assert auto_compile(False, torch.device("cuda")) is False
    assert auto_compile("eager", torch.device("cpu")) == "eager"


def test_llamagen_export_loads_and_samples_the_same(tmp_path, parts, runs):
    model = Pipeline.load(runs["baseline"]).model
    export_llamagen(model, tmp_path / "c2i_tiny.pt")
    loaded = load_llamagen_gpt(tmp_path / "c2i_tiny.pt", grid_size=8)
    assert loaded.config.to_dict() | {"multiple_of": 0} == model.config.to_dict() | {"multiple_of": 0}
    labels = torch.tensor([1, 2, 3])
    a = generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(4))
    b = generate(loaded, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    # the same through the pipeline: a LlamaGen .pt with --tokenizer gives the run's images
    ours = Pipeline.load(runs["baseline"]).sample([1, 2, 3], seed=4)
    theirs = Pipeline.load(tmp_path / "c2i_tiny.pt", tokenizer=parts["tok_path"], grid_size=8).sample(
        [1, 2, 3], seed=4
    )
    assert torch.equal(ours, theirs)
    with pytest.raises(ClusterarError, match="--tokenizer"):
        Pipeline.load(tmp_path / "c2i_tiny.pt")


# ----------------------------------------------------------------------------- pipelines


def test_baseline_pipeline_images_and_seeds(runs):
    pipe = Pipeline.load(runs["baseline"])
    assert pipe.method == "baseline" and pipe.image_size == 32
    a = pipe.sample([0, 1, 2, 3], seed=11)
    assert a.shape == (4, 32, 32, 3) and a.dtype == torch.uint8
    assert torch.equal(a, pipe.sample([0, 1, 2, 3], seed=11))
    assert not torch.equal(a, pipe.sample([0, 1, 2, 3], seed=12))
    p = pipe.params()
    assert p["total"] == p["stage1"]["total"] == sum(x.numel() for x in pipe.model.parameters())
    timing = pipe.time(batch_size=2, batches=1, warmup=0)
    assert timing["images"] == 2 and timing["images_per_s"] > 0
    with pytest.raises(ClusterarError, match=r"\[0, 10\)"):
        pipe.sample([10])


def test_bf16_sampling_weights_keep_each_steps_distribution(runs):
    """On CUDA `Pipeline.load` casts the transformers' weights to bf16 (`runtime.sampling_dtype`: half the
    bytes each decode step reads). Measured here under CPU bf16 autocast, as CUDA runs it: every position's
    next-token distribution stays within KL 0.01 nats of the float32 one (mean under 0.002); the RoPE table
    stays float32. On CPU the default keeps float32 weights."""
    from clusterar.runtime import sampling_dtype

    assert sampling_dtype(torch.device("cuda")) == torch.bfloat16
    assert sampling_dtype(torch.device("cpu")) == torch.float32
    assert Pipeline.load(runs["baseline"]).model.output.weight.dtype == torch.float32
    pipe = Pipeline.load(runs["baseline"], weights=torch.bfloat16)
    ref = Pipeline.load(runs["baseline"]).model
    bf16 = pipe.model
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters()) and bf16.freqs_cis.dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(ref.config.vocab_size, (8, ref.config.seq_len - 1), generator=gen)
    labels = torch.arange(8) % ref.config.num_classes
    with torch.no_grad():
        p = ref(idx, labels).log_softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q = bf16(idx, labels).float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.max() < 0.01 and kl.mean() < 0.002, (kl.max(), kl.mean())


def test_iar_ids_are_mapped_back(parts, runs):
    pipe = Pipeline.load(runs["iar"])
    assert pipe.method == "iar" and pipe.id_space == "rearranged"
    t = pipe.sample_tokens([3, 4, 5], seed=2)
    manual_ids = unmap_tokens(t.raw, parts["balanced"])
    assert torch.equal(t.ids, manual_ids) and not torch.equal(t.ids, t.raw)
    with torch.no_grad():
        manual = to_uint8(parts["tok"].decode(manual_ids.view(3, 8, 8))).permute(0, 2, 3, 1)
    assert torch.equal(pipe.sample([3, 4, 5], seed=2), manual)


def test_ctf_end_to_end(tmp_path, parts, runs):
    out = tmp_path / "sub" / "pipeline.json"
    d = write_ctf_pipeline(runs["coarse"], runs["refiner"], out)
    assert not Path(d["coarse"]).is_absolute() and d["restrict_to_cluster"] is False
    pipe = Pipeline.load(out)
    assert pipe.method == "ctf" and not pipe.restrict_to_cluster
    a = pipe.sample([0, 5, 9], seed=1)
    assert a.shape == (3, 32, 32, 3) and a.dtype == torch.uint8
    assert torch.equal(a, Pipeline.load(out).sample([0, 5, 9], seed=1))
    t = pipe.sample_tokens([0, 5, 9], seed=1)
    assert t.coarse.shape == t.ids.shape == (3, 64)
    assert int(t.coarse.max()) < M and int(t.ids.max()) < K
    p = pipe.params()
    assert p["stage1"]["output"] == M * 64 and p["stage2"]["tok_embeddings"] == M * 64
    assert p["total"] == p["stage1"]["total"] + p["stage2"]["total"]
    # the refiner's single forward pass, guided or not, on the sampled coarse sequence
    y = torch.tensor([0, 5, 9])
    f1 = refine(pipe.refiner, t.coarse, y, top_k=1)
    f2 = refine(pipe.refiner, t.coarse, y, top_k=1, cfg_scale=3.0)
    assert f1.shape == (3, 64) and not torch.equal(f1, f2)


def test_ctf_restrict_to_cluster(tmp_path, parts, runs):
    labels = parts["kmeans"].labels
    write_ctf_pipeline(runs["coarse"], runs["refiner"], tmp_path / "a.json")
    write_ctf_pipeline(runs["coarse"], runs["refiner-restricted"], tmp_path / "b.json")
    free = Pipeline.load(tmp_path / "a.json")
    t = free.sample_tokens(list(range(10)), seed=0)
    assert (labels[t.ids] != t.coarse).any()  # the random refiner strays without the mask
    for pipe in (
        Pipeline.load(tmp_path / "a.json", restrict_to_cluster=True),  # flag
        Pipeline.load(tmp_path / "b.json"),  # recorded in the refiner's metadata
    ):
        assert pipe.restrict_to_cluster
        t = pipe.sample_tokens(list(range(10)), seed=0)
        assert torch.equal(labels[t.ids], t.coarse)
    with pytest.raises(ClusterarError, match="same mask"):
        Pipeline.load(tmp_path / "b.json", restrict_to_cluster=False)


def test_mismatches_are_refused(make_tokenizer, tmp_path, parts, runs):
    # a CTF stage on its own
    with pytest.raises(ClusterarError, match="clusterar pipeline ctf"):
        Pipeline.load(runs["coarse"])
    # another tokenizer than the one the model was trained with
    other = make_tokenizer(123)
    save_tokenizer(other, tmp_path / "other.safetensors")
    with pytest.raises(ClusterarError, match="fingerprint"):
        Pipeline.load(runs["baseline"], tokenizer=tmp_path / "other.safetensors")
    # clusters computed on another codebook
    wrong = CodebookClusters.from_labels(
        parts["balanced"].labels, other.quantize.embedding.weight.detach(), "b", M
    )
    wrong.save(tmp_path / "wrong.safetensors")
    iar = write_run(
        tmp_path / "iar-wrong",
        random_gpt(2),
        run_info(parts, "iar", None, clusters=str(tmp_path / "wrong.safetensors"), id_space="rearranged"),
    )
    with pytest.raises(ClusterarError, match="computed on codebook"):
        Pipeline.load(iar)
    # a clusters file other than the one the model recorded
    with pytest.raises(ClusterarError, match="trained with clusters"):
        Pipeline.load(runs["iar"], clusters=parts["dir"] / "kmeans.safetensors")
    # two CTF stages trained with different clusters
    refiner_b = write_run(
        tmp_path / "refiner-b",
        random_gpt(4, input_vocab_size=M, causal=False),
        run_info(parts, "ctf-refiner", "balanced"),
    )
    with pytest.raises(ClusterarError, match="different clusters"):
        write_ctf_pipeline(runs["coarse"], refiner_b, tmp_path / "p.json")
    with pytest.raises(ClusterarError, match="ctf-refiner"):
        write_ctf_pipeline(runs["coarse"], runs["baseline"], tmp_path / "p.json")
    # a pipeline whose model file changed since it was written
    write_ctf_pipeline(runs["coarse"], runs["refiner"], tmp_path / "ok.json")
    d = json.loads((tmp_path / "ok.json").read_text())
    d["refiner"] = str(refiner_b / "model.safetensors")
    (tmp_path / "ok.json").write_text(json.dumps(d))
    with pytest.raises(ClusterarError, match="changed since"):
        Pipeline.load(tmp_path / "ok.json")


# ----------------------------------------------------------------------------- folders and the CLI


def test_make_labels():
    y, how = make_labels(20, 10, per_class=True)
    assert np.array_equal(y, np.repeat(np.arange(10), 2)) and "2 per class" in how
    y, how = make_labels(23, 10, per_class=True)
    assert np.array_equal(np.bincount(y), [3, 3, 3] + [2] * 7) and "0..2 get 3" in how
    assert np.array_equal(make_labels(5, 10, labels=[1, 2])[0], [1, 2, 1, 2, 1])
    assert np.array_equal(make_labels(50, 10, seed=3)[0], make_labels(50, 10, seed=3)[0])
    with pytest.raises(ClusterarError, match="--labels"):
        make_labels(5, 10, labels=[10])


def test_cli_sample_writes_outputs(tmp_path, runs, capsys):
    out = tmp_path / "s"
    args = ["sample", str(runs["baseline"]), "--n", "20", "--per-class", "--batch-size", "8", "--no-progress"]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "grid.png").is_file()
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(20)]
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (20, 32, 32, 3) and z["arr_0"].dtype == np.uint8
        assert np.array_equal(z["arr_1"], np.repeat(np.arange(10), 2))
        first = z["arr_0"]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "images" / "000013.png")), first[13])
    info = json.loads((out / "sample.json").read_text())
    assert info["images"] == 20 and info["run"]["settings"]["cfg_scale"] == 2.0 and info["images_per_s"] > 0
    assert not (out / "parts").exists()
    # same command again: nothing to do, also with the model's path spelled another way, and the old
    # speed is not reported as if it had run; other settings in the same folder: refused
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    said = capsys.readouterr()
    assert "already complete" in said.err and "unchanged:" in said.out and "images/s" not in said.out
    respelled = [args[0], os.path.relpath(runs["baseline"]) + "/", *args[2:]]
    assert main([*respelled, "--out", str(out), "--device", "cpu"]) == 0
    assert "already complete" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--device", "cpu", "--seed", "1"]) == 2
    assert "other settings" in capsys.readouterr().err
    # CTF through its pipeline file, with the stage-2 flags
    assert main(["pipeline", "ctf", "--coarse", str(runs["coarse"]), "--refiner", str(runs["refiner"]),
                 "--out", str(tmp_path / "ctf.json")]) == 0  # fmt: skip
    assert main(["sample", str(tmp_path / "ctf.json"), "--n", "4", "--labels", "1,2", "--temperature2", "0.5",
                 "--top-k2", "3", "--out", str(tmp_path / "c"), "--no-progress"]) == 0  # fmt: skip
    info = json.loads((tmp_path / "c" / "sample.json").read_text())
    assert info["run"]["settings"]["temperature"] == 1.1 and info["run"]["settings"]["top_k2"] == 3
    with np.load(tmp_path / "c" / "samples.npz") as z:
        assert z["arr_0"].shape == (4, 32, 32, 3) and z["arr_1"].tolist() == [1, 2, 1, 2]


def test_interrupted_sampling_resumes_exactly(tmp_path, runs):
    pipe = Pipeline.load(runs["baseline"])
    labels, _ = make_labels(10, 10, per_class=True)
    settings = pipe.settings()
    full = sample_to_folder(pipe, labels, tmp_path / "full", settings=settings, batch_size=4, progress=False)
    assert full["batches_generated"] == 3

    calls = {"n": 0}
    real = pipe.sample

    def stop_after_two(*a, **kw):  # a Ctrl-C during the third batch
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    pipe.sample = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        sample_to_folder(pipe, labels, tmp_path / "cut", settings=settings, batch_size=4, progress=False)
    assert len(list((tmp_path / "cut" / "parts").glob("batch-*.npy"))) == 2
    pipe.sample = real
    again = sample_to_folder(pipe, labels, tmp_path / "cut", settings=settings, batch_size=4, progress=False)
    assert again["batches_reused"] == 2 and again["batches_generated"] == 1
    with np.load(tmp_path / "full" / "samples.npz") as a, np.load(tmp_path / "cut" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_a_failed_write_stops_sampling_and_marks_no_batch_done(tmp_path, runs, monkeypatch):
    """Images are written on a writer thread while the next batch is drawn: a write that fails is raised
    in the caller, and the batch it belonged to is not marked done (no part file), so a rerun redraws it."""
    import clusterar.sample.folder as folder

    pipe = Pipeline.load(runs["baseline"])
    labels, _ = make_labels(8, 10, per_class=False)
    real, written = folder._save_png, []

    def disk_full_in_batch_two(img, path):
        if int(path.stem) >= 4:
            raise OSError(28, "No space left on device")
        written.append(path.name)
        real(img, path)

    monkeypatch.setattr(folder, "_save_png", disk_full_in_batch_two)
    with pytest.raises(OSError, match="No space left"):
        sample_to_folder(pipe, labels, tmp_path / "s", settings=pipe.settings(), batch_size=4, progress=False)
    assert [p.name for p in (tmp_path / "s" / "parts").glob("batch-*.npy")] == ["batch-000000.npy"]
    assert len(written) == 4


def test_two_processes_draw_the_one_process_samples_and_resume(tmp_path, runs, torchrun):
    """Under torchrun each process draws every world-th batch with that batch's seed: the npz is the one
    one process writes; a run killed in one process continues, also with another number of processes."""
    args = [
        str(runs["baseline"]),
        "--num-samples",
        "20",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "clusterar", "sample", *args, "--out", str(tmp_path / "one")],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    two = ["--out", str(tmp_path / "two")]
    killed = torchrun(
        [*args, *two], tmp_path, env={"CLUSTERAR_KILL_AT": "sample.batch:1@1"}, command="sample"
    )
    assert killed.returncode != 0
    drawn = sorted(p.name for p in (tmp_path / "two" / "parts").glob("batch-*.npy"))
    assert "batch-000001.npy" in drawn and "batch-000003.npy" not in drawn  # rank 1 died after its first
    res = torchrun([*args, *two], tmp_path, command="sample")
    assert res.returncode == 0, res.stderr
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    info = json.loads((tmp_path / "two" / "sample.json").read_text())
    assert info["processes"] == 2 and info["batches_reused"] == len(drawn) and info["images"] == 20
    assert not (tmp_path / "two" / "parts").exists()


# ----------------------------------------------------------------------------- refiner-free stage 2


def test_draw_in_cluster_stays_in_the_cluster_and_follows_the_weights():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
    cl = CodebookClusters.from_labels(labels, torch.randn(10, 4), "kmeans", 3)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), cl.sizes.cumsum(0)])
    weights = torch.tensor([1.0, 0, 3, 0, 2, 0, 0, 0, 2, 0])  # cluster 2 (codes 3, 6, 7) weighs nothing
    coarse = torch.tensor([0, 1, 2]).repeat(30000, 1)
    ids = draw_in_cluster(coarse, cl.inverse, starts, weights, torch.Generator().manual_seed(0))
    assert ids.shape == coarse.shape and torch.equal(labels[ids], coarse)
    share = torch.bincount(ids.reshape(-1), minlength=10).double() / 30000
    want = torch.tensor([0.25, 0, 0.75, 1 / 3, 0.5, 0, 1 / 3, 1 / 3, 0.5, 0], dtype=torch.float64)
    torch.testing.assert_close(share, want, atol=0.015, rtol=0)
    assert share[[1, 5, 9]].sum() == 0  # weight 0 in a cluster with weight: never drawn


def test_ctf_without_refiner_uniform_and_by_frequency(tmp_path, parts, runs):
    from clusterar.tokens import write_token_file

    km = parts["kmeans"]
    first = torch.tensor([int((km.labels == c).nonzero()[0]) for c in range(M)])  # one code per cluster
    rng = np.random.default_rng(0)
    codes = first.numpy()[rng.integers(0, M, (20, 1, 64))]
    tok = parts["tok"]
    meta = {
        "tokenizer_fingerprint": tok.fingerprint(),
        "codebook_fingerprint": tok.codebook_fingerprint(),
        "codebook_size": K,
        "grid": [8, 8],
        "image_size": 32,
        "views": ["original"],
        "dataset": "test",
        "split": "train",
        "num_classes": CLASSES,
        "class_names": None,
        "permutation": None,
    }
    write_token_file(
        tmp_path / "train.safetensors", codes.astype(np.int16), rng.integers(0, CLASSES, 20), meta
    )
    info = run_info(parts, "ctf-coarse", "kmeans", tokens=str(tmp_path / "train.safetensors"))
    coarse = write_run(tmp_path / "coarse", random_gpt(3, vocab_size=M), info)
    write_ctf_pipeline(coarse, runs["refiner"], tmp_path / "p.json")
    pipe = Pipeline.load(tmp_path / "p.json")
    y = list(range(CLASSES))
    refined = pipe.sample_tokens(y, seed=2)
    for mode in ("uniform", "frequency"):
        t = pipe.sample_tokens(y, seed=2, stage2=mode)
        assert torch.equal(t.coarse, refined.coarse)  # stage 1 draws the same labels
        assert torch.equal(km.labels[t.ids], t.coarse)  # every code inside its cluster
        assert torch.equal(t.ids, pipe.sample_tokens(y, seed=2, stage2=mode).ids)  # seeded
    t = pipe.sample_tokens(y, seed=2, stage2="frequency")
    assert torch.equal(t.ids, first[t.coarse])  # only the codes the training tokens hold
    assert torch.equal(
        pipe.code_weights("frequency").cpu(),
        torch.bincount(torch.from_numpy(codes).reshape(-1).long(), minlength=K),
    )
    assert pipe.sample(y, seed=2, stage2="uniform").shape == (CLASSES, 32, 32, 3)
    # a pipeline whose stage-1 run records no token file says what is missing
    write_ctf_pipeline(runs["coarse"], runs["refiner"], tmp_path / "q.json")
    with pytest.raises(ClusterarError, match="stage2 = frequency draws codes by their frequency"):
        Pipeline.load(tmp_path / "q.json").sample_tokens(y, stage2="frequency")
    with pytest.raises(ClusterarError, match="stage2 must be one of refiner, uniform, frequency"):
        pipe.sample_tokens(y, stage2="median")
