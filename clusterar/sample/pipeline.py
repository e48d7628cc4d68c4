"""A `Pipeline` ties a tokenizer, the model(s) and the clusters together and turns class labels into uint8
images.

It loads from a run folder / model file (baseline, IAR), a LlamaGen checkpoint (baseline, with
--tokenizer), or a pipeline JSON (CTF, written by `write_ctf_pipeline` / `clusterar pipeline ctf`), and
checks every fingerprint on the way, so a model is never decoded with another tokenizer or clusters than
those it was trained with (model files and those checks are `clusterar.model_file`'s). The checks that
the parts belong together live in `_check_*` functions, so the constructor reads as the data flow.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import PT_SUFFIXES
from ..clusters import CodebookClusters
from ..data import to_uint8
from ..errors import ClusterarError
from ..fileio import read_json, write_json
from ..gpt import GPT, param_breakdown
from ..methods import Method
from ..model_file import (
    MODEL_FILE,
    ModelInfo,
    load_checked_clusters,
    load_checked_tokenizer,
    load_llamagen_model,
    load_model,
    read_model_info,
    resolve_model_file,
)
from ..runtime import cast_weights, sampling_dtype
from ..tokenizer import VQModel, load_tokenizer, resolve_tokenizer_path
from ..tokens import TokenFile
from .generate import SampledTokens, SampleSettings, draw_in_cluster, generate, refine

PIPELINE_KIND = "clusterar.pipeline"
PIPELINE_VERSION = 1
LLAMAGEN_SUFFIXES = PT_SUFFIXES

# ----------------------------------------------------------------------------- loading helpers


def _resolve(base: Path, p: str | None) -> str | None:
    if p is None:
        return None
    q = Path(p)
    return str(q if q.is_absolute() else (base / q))


# ----------------------------------------------------------------------------- pipeline checks


def _check(ok: bool, source: str, msg: str) -> None:
    if not ok:
        raise ClusterarError(f"{source}: {msg}")


def _check_single_model(model: GPT, info: ModelInfo, codes: int, source: str) -> str:
    """A baseline or IAR model on its own: causal, predicting the tokenizer's codes. Returns its method."""
    method = info.method
    c = model.config
    if info.is_ctf_stage:
        raise ClusterarError(
            f"{source} is one stage of CTF ({method}); tie both stages together with `clusterar "
            "pipeline ctf --coarse RUN1 --refiner RUN2 --out pipeline.json` and sample that"
        )
    if method not in ("baseline", "iar"):
        raise ClusterarError(
            f"{source} has method {method!r}; a model file from `clusterar train` records baseline, "
            "iar, ctf-coarse or ctf-refiner"
        )
    _check(c.causal, source, "the model must be causal (autoregressive)")
    _check(
        c.vocab_size == codes,
        source,
        f"the model predicts {c.vocab_size} tokens, the tokenizer has {codes} codes",
    )
    return method


def _check_ctf_stages(
    model: GPT,
    info: ModelInfo,
    refiner: GPT,
    refiner_info: ModelInfo,
    clusters: CodebookClusters | None,
    codes: int,
    source: str,
) -> None:
    """CTF's two stages fit each other, the clusters and the tokenizer: vocabularies, grids, classes and the
    fingerprints both were trained with."""
    method = info.method
    c, r = model.config, refiner.config
    _check(
        method == "ctf-coarse" and refiner_info.method == "ctf-refiner",
        source,
        f"CTF needs a ctf-coarse and a ctf-refiner model, got {method!r} and {refiner_info.method!r}",
    )
    _check(c.causal and not r.causal, source, "stage 1 must be causal and the refiner bidirectional")
    _check(clusters is not None, source, "CTF needs the clusters both stages were trained with")
    m = clusters.n_clusters
    _check(c.vocab_size == m, source, f"stage 1 predicts {c.vocab_size} labels, the clusters are {m}")
    _check(
        r.input_vocab_size == m,
        source,
        f"the refiner reads {r.input_vocab_size} labels, the clusters are {m}",
    )
    _check(
        r.vocab_size == codes,
        source,
        f"the refiner predicts {r.vocab_size} tokens, the tokenizer has {codes} codes",
    )
    _check(
        (r.grid_size, r.num_classes) == (c.grid_size, c.num_classes),
        source,
        f"stage 1 has a {c.grid_size}x{c.grid_size} grid and {c.num_classes} classes, the refiner "
        f"{r.grid_size}x{r.grid_size} and {r.num_classes}",
    )
    _check(
        refiner_info.tokenizer_fingerprint == info.tokenizer_fingerprint
        and refiner_info.clusters_fingerprint == info.clusters_fingerprint,
        source,
        "the two stages were trained with different tokenizers or clusters",
    )


def _check_clusters(
    clusters: CodebookClusters, codes: int, infos: tuple[ModelInfo, ...], source: str
) -> None:
    """The clusters cover the tokenizer's codes and are those the models were trained with."""
    _check(
        clusters.num_codes == codes,
        source,
        f"the clusters cover {clusters.num_codes} codes, the tokenizer {codes}",
    )
    for m in infos:
        fp = m.clusters_fingerprint
        _check(
            fp is None or fp == clusters.fingerprint(), source, "the models were trained with other clusters"
        )


def _unmap_table(
    method: str, id_space: str, clusters: CodebookClusters | None, device: torch.device, source: str
) -> torch.Tensor | None:
    """rearranged id -> original id for IAR models trained on rearranged ids; None when ids need no mapping."""
    if method == "iar" and id_space == "rearranged":
        _check(clusters is not None, source, "IAR's rearranged ids need the clusters file to map them back")
        return clusters.inverse.to(device)
    return None


def _code_counts(path: str | None, info: ModelInfo, k: int, source: str, block: int = 4096) -> np.ndarray:
    """How often each of the k codes occurs in a token file (every image and view), read block by block."""
    if not path or not Path(path).exists():
        raise ClusterarError(
            f"stage2 = frequency draws codes by their frequency in the training tokens, which {source} records "
            f"as {path!r}: not found; restore that token file, or sample with stage2 = uniform"
        )
    tf = TokenFile.open(path)
    if tf.meta.get("tokenizer_fingerprint") != info.tokenizer_fingerprint:
        raise ClusterarError(
            f"{path} was encoded by tokenizer {tf.meta.get('tokenizer_fingerprint')}, not the pipeline's "
            f"{info.tokenizer_fingerprint}; it cannot give the codes' frequencies"
        )
    counts = np.zeros(k, dtype=np.int64)
    for lo in range(0, len(tf), block):
        counts += np.bincount(np.asarray(tf.codes[lo : lo + block]).reshape(-1), minlength=k)
    return counts


# ----------------------------------------------------------------------------- pipeline


class Pipeline:
    """Tokenizer + method + model(s) + clusters: class labels in, uint8 images [B, H, W, 3] out.

    method "baseline" / "iar": one causal model (IAR's rearranged ids are mapped back with
    clusters.inverse before decoding). method "ctf": the coarse model (stage 1) and the refiner (stage 2).
    The constructor checks that the parts belong together; `load` reads them from files.
    """

    def __init__(
        self,
        tokenizer: VQModel,
        model: GPT,
        info: ModelInfo,
        *,
        refiner: GPT | None = None,
        refiner_info: ModelInfo | None = None,
        clusters: CodebookClusters | None = None,
        restrict_to_cluster: bool | None = None,
        source: str | None = None,
    ):
        self.tokenizer, self.model, self.info = tokenizer.eval(), model.eval(), info
        self.refiner, self.refiner_info = refiner, refiner_info or ModelInfo()
        self.clusters = clusters
        self.source = source or "the pipeline"
        self.device = model.tok_embeddings.weight.device
        codes = tokenizer.config.codebook_size
        if refiner is None:
            self.method = _check_single_model(model, info, codes, self.source)
        else:
            self.method = "ctf"
            _check_ctf_stages(model, info, refiner, self.refiner_info, clusters, codes, self.source)
        if clusters is not None:
            _check_clusters(clusters, codes, (info, self.refiner_info), self.source)
        self.id_space = info.id_space
        self._unmap = _unmap_table(self.method, self.id_space, clusters, self.device, self.source)
        # IAR draws in the tokenizer's id order (see `generate`): a converted model samples its original's images
        self._draw_order = clusters.perm.to(self.device) if self._unmap is not None else None
        self.restrict_to_cluster = Method.sampling_restricted(
            restrict_to_cluster, self.refiner_info.restrict_to_cluster, refiner is not None, self.source
        )
        self._cluster_labels = clusters.labels.to(self.device) if self.restrict_to_cluster else None
        self._code_weights: dict[str, torch.Tensor] = {}  # refiner-free stage 2's, made when first asked
        self.grid = model.config.grid_size
        self.image_size = self.grid * tokenizer.config.downsample
        self.num_classes = model.config.num_classes
        self.class_names = info.class_names

    # --------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        tokenizer: str | os.PathLike | None = None,
        clusters: str | os.PathLike | None = None,
        restrict_to_cluster: bool | None = None,
        grid_size: int | None = None,
        weights: torch.dtype | None = None,
    ) -> Pipeline:
        """From a run folder or model.safetensors (baseline, iar), a pipeline JSON (ctf), or a LlamaGen
        checkpoint .pt (baseline; needs `tokenizer`, `grid_size` defaults to 16). `tokenizer` and `clusters`
        override the paths recorded in the files (their fingerprints must still match). The transformers'
        weights are cast to `weights` (default `runtime.sampling_dtype`: bf16 on CUDA, float32 on CPU)."""
        pipe = cls._load(Path(path), device, tokenizer, clusters, restrict_to_cluster, grid_size)
        dtype = weights if weights is not None else sampling_dtype(pipe.device)
        for model in (pipe.model, pipe.refiner):
            if model is not None:
                cast_weights(model, dtype)
        return pipe

    @classmethod
    def _load(cls, p: Path, device, tokenizer, clusters, restrict_to_cluster, grid_size) -> Pipeline:
        if p.is_dir() and not (p / MODEL_FILE).is_file() and (p / "pipeline.json").is_file():
            p = p / "pipeline.json"
        if p.suffix == ".json":
            return cls._from_json(p, device, tokenizer, clusters, restrict_to_cluster)
        if p.suffix in LLAMAGEN_SUFFIXES:
            return cls._from_llamagen(p, device, tokenizer, grid_size)
        p = resolve_model_file(p, "model")
        info = read_model_info(p, "model to sample")
        who = f"model {p}"
        if info.is_ctf_stage:
            raise ClusterarError(
                f"{p} is one stage of CTF ({info.method}); tie both stages together with `clusterar pipeline "
                "ctf --coarse RUN1 --refiner RUN2 --out pipeline.json` and sample that"
            )
        if info.method is None:
            raise ClusterarError(
                f"{p} records no training method; sample models written by `clusterar train`"
            )
        tok_path = tokenizer or info.tokenizer
        if tok_path is None:
            raise ClusterarError(f"{p} records no tokenizer; pass --tokenizer")
        tok = load_checked_tokenizer(tok_path, info.tokenizer_fingerprint, who)
        cl = None
        if info.method == "iar" and info.rearranged:
            cl = load_checked_clusters(
                clusters or info.clusters, info.clusters_fingerprint, tok, str(tok_path), who
            )
        model, info = load_model(p, device)
        return cls(tok.to(device), model, info, clusters=cl, source=str(p))

    @classmethod
    def _from_llamagen(cls, p: Path, device, tokenizer, grid_size: int | None) -> Pipeline:
        if tokenizer is None:
            raise ClusterarError(
                f"{p} is a LlamaGen checkpoint, which names no tokenizer; pass --tokenizer (e.g. vq_ds16_c2i.pt)"
            )
        tok = load_tokenizer(resolve_tokenizer_path(tokenizer))
        model, info = load_llamagen_model(p, tokenizer, grid_size=grid_size or 16, device=device)
        return cls(tok.to(device), model, info, source=str(p))

    @classmethod
    def _from_json(cls, p: Path, device, tokenizer, clusters, restrict_to_cluster) -> Pipeline:
        d = read_json(p, "pipeline file")
        if d.get("kind") != PIPELINE_KIND or d.get("method") != "ctf":
            raise ClusterarError(
                f"{p} is not a CTF pipeline file (kind {d.get('kind')!r}, method {d.get('method')!r}); write one "
                "with `clusterar pipeline ctf`"
            )
        if d.get("version", 0) > PIPELINE_VERSION:
            raise ClusterarError(f"{p} was written by a newer clusterar (version {d['version']}); upgrade")
        base = p.resolve().parent
        try:
            coarse_p = resolve_model_file(_resolve(base, d["coarse"]), "CTF stage-1 model")
            refiner_p = resolve_model_file(_resolve(base, d["refiner"]), "CTF refiner")
            tok_path = tokenizer or _resolve(base, d["tokenizer"])
            cl_path = clusters or _resolve(base, d["clusters"])
            tok_fp, cl_fp = d["tokenizer_fingerprint"], d["clusters_fingerprint"]
        except KeyError as e:
            raise ClusterarError(
                f"pipeline file {p} lacks the field {e}; write it again with `clusterar pipeline ctf`"
            ) from e
        who = f"pipeline {p}"
        for mp in (coarse_p, refiner_p):
            m = read_model_info(mp)
            if (m.tokenizer_fingerprint, m.clusters_fingerprint) != (tok_fp, cl_fp):
                raise ClusterarError(
                    f"{mp} was trained with tokenizer {m.tokenizer_fingerprint} and clusters "
                    f"{m.clusters_fingerprint}, but {p} ties tokenizer {tok_fp} and clusters {cl_fp}; the "
                    "model file changed since the pipeline was written: write it again with `clusterar pipeline ctf`"
                )
        tok = load_checked_tokenizer(tok_path, tok_fp, who)
        cl = load_checked_clusters(cl_path, cl_fp, tok, str(tok_path), who)
        coarse, coarse_info = load_model(coarse_p, device)
        refiner, refiner_info = load_model(refiner_p, device)
        if restrict_to_cluster is None and d.get("restrict_to_cluster"):
            restrict_to_cluster = True
        return cls(
            tok.to(device),
            coarse,
            coarse_info,
            refiner=refiner,
            refiner_info=refiner_info,
            clusters=cl,
            restrict_to_cluster=restrict_to_cluster,
            source=str(p),
        )

    # --------------------------------------------------------------- sampling

    def settings(self, **overrides: Any) -> SampleSettings:
        """This method's default settings with the non-None overrides applied."""
        return SampleSettings.for_method(self.method, **overrides)

    def _labels(self, labels: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1).to(self.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ClusterarError(
                f"class labels must lie in [0, {self.num_classes}) for {self.source}, got {int(t.min())}..{int(t.max())}"
            )
        return t

    def sample_tokens(
        self,
        labels: Any,
        seed: int = 0,
        *,
        settings: SampleSettings | None = None,
        compile: bool | str | None = None,
        use_cache: bool = True,
        **overrides: Any,
    ) -> SampledTokens:
        """Token ids for class `labels`, drawn with torch.Generator(device).manual_seed(seed).

        `compile` (None: on CUDA, `generate.auto_compile`): the decode step (and CTF's refiner) compiled."""
        s = settings or self.settings(**overrides)
        y = self._labels(labels)
        g = torch.Generator(self.device).manual_seed(int(seed))
        raw = generate(  # CTF: stage 1, the coarse labels
            self.model,
            y,
            cfg_scale=s.cfg_scale,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            generator=g,
            compile=compile,
            use_cache=use_cache,
            draw_order=self._draw_order,
        )
        if self.method == "ctf" and s.stage2 != "refiner":
            inv, starts = self._cluster_layout()
            fine = draw_in_cluster(raw, inv, starts, self.code_weights(s.stage2), g)
            return SampledTokens(ids=fine, raw=fine, coarse=raw)
        if self.method == "ctf":
            fine = refine(
                self.refiner,
                raw,
                y,
                cfg_scale=s.cfg_scale2,
                temperature=s.temperature2,
                top_k=s.top_k2,
                generator=g,
                cluster_labels=self._cluster_labels,
                compile=compile,
            )
            return SampledTokens(ids=fine, raw=fine, coarse=raw)
        ids = self._unmap[raw] if self._unmap is not None else raw
        return SampledTokens(ids=ids, raw=raw)

    def _cluster_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes cluster by cluster (clusters.inverse) and where each cluster starts, on the device."""
        sizes = self.clusters.sizes
        starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
        return self.clusters.inverse.to(self.device), starts.to(self.device)

    def code_weights(self, mode: str) -> torch.Tensor:
        """[K] weights of refiner-free stage 2: ones ("uniform"), or how often each code occurs in the
        training tokens of stage 1 ("frequency", counted once, in blocks, from the token file its model
        file records)."""
        if mode not in self._code_weights:
            k = self.tokenizer.config.codebook_size
            if mode == "uniform":
                w = torch.ones(k)
            else:
                w = torch.from_numpy(_code_counts(self.info.tokens, self.info, k, self.source))
            self._code_weights[mode] = w.to(self.device)
        return self._code_weights[mode]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Original token ids [B, N] -> uint8 images [B, H, W, 3] on the CPU (float32 decoder, as LlamaGen)."""
        x = self.tokenizer.decode(ids.to(self.device).view(-1, self.grid, self.grid))
        img = to_uint8(x.float()).permute(0, 2, 3, 1)
        if img.shape[-1] == 1:  # grayscale tokenizer: three equal channels, as the ADM format expects
            img = img.expand(*img.shape[:-1], 3)
        return img.contiguous().cpu()

    def sample(self, labels: Any, seed: int = 0, **kw: Any) -> torch.Tensor:
        """uint8 images [B, H, W, 3] for class `labels` (see `sample_tokens` for the keywords)."""
        return self.decode(self.sample_tokens(labels, seed, **kw).ids)

    # --------------------------------------------------------------- accounting

    def params(self) -> dict[str, Any]:
        """Parameters per stage (`gpt.param_breakdown`): stage1 = the autoregressive model, stage2 = refiner."""
        out: dict[str, Any] = {"stage1": param_breakdown(self.model)}
        if self.refiner is not None:
            out["stage2"] = param_breakdown(self.refiner)
        out["total"] = sum(v["total"] for v in out.values())
        return out

    def sync(self) -> None:
        """Wait for the GPU's queued work, so that a timer read next measures it (a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(
        self,
        batch_size: int,
        batches: int = 2,
        warmup: int = 1,
        *,
        decode: bool = True,
        compile: bool | str | None = None,
        use_cache: bool = True,
        seed: int = 0,
        **overrides: Any,
    ) -> dict[str, float]:
        """Images per second over `batches` timed batches after `warmup` untimed ones (compilation, CUDA
        graph capture, allocator warm-up); `decode=False` times the tokens only."""
        if batch_size < 1 or batches < 1 or warmup < 0:
            raise ClusterarError(
                f"time needs batch_size, batches >= 1 and warmup >= 0, got {batch_size}, {batches}, {warmup}"
            )
        s = self.settings(**overrides)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=torch.Generator().manual_seed(seed))
        for i in range(warmup + batches):
            if i == warmup:
                self.sync()
                start = time.perf_counter()
            tokens = self.sample_tokens(y, seed + i, settings=s, compile=compile, use_cache=use_cache)
            if decode:
                self.decode(tokens.ids)
        self.sync()
        seconds = time.perf_counter() - start
        return {
            "images_per_s": batch_size * batches / seconds,
            "seconds": seconds,
            "images": batch_size * batches,
        }

    def describe(self) -> dict[str, Any]:
        """What sample.json records about the pipeline."""
        d = {
            "source": self.source,
            "method": self.method,
            "grid": self.grid,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "step": self.info.step,
            "tokenizer": self.info.tokenizer,
            "params": self.params(),
        }
        if self.method == "ctf":
            d.update(refiner_step=self.refiner_info.step, restrict_to_cluster=self.restrict_to_cluster)
        if self.clusters is not None:
            d["clusters"] = self.clusters.source
        return d


# ----------------------------------------------------------------------------- CTF pipeline files


def write_ctf_pipeline(
    coarse: str | os.PathLike,
    refiner: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    clusters: str | os.PathLike | None = None,
    restrict_to_cluster: bool = False,
) -> dict:
    """Write the JSON that ties a CTF stage-1 run and a refiner run to their tokenizer and clusters.

    Everything is checked first (methods, grids, classes, vocabularies, and that both stages were trained
    with the same tokenizer and clusters, the clusters computed on that tokenizer's codebook); paths are
    stored relative to the JSON's folder, so the tree can move as a whole. Returns the JSON written.
    """
    out = Path(out)
    coarse_p = resolve_model_file(coarse, "--coarse")
    refiner_p = resolve_model_file(refiner, "--refiner")
    cm, rm = read_model_info(coarse_p), read_model_info(refiner_p)
    if cm.method != "ctf-coarse":
        raise ClusterarError(
            f"--coarse {coarse_p} is a {cm.method!r} model; pass a run of --method ctf-coarse"
        )
    if rm.method != "ctf-refiner":
        raise ClusterarError(
            f"--refiner {refiner_p} is a {rm.method!r} model; pass a run of --method ctf-refiner"
        )
    for key, what in (("tokenizer_fingerprint", "tokenizers"), ("clusters_fingerprint", "clusters")):
        if getattr(cm, key) != getattr(rm, key):
            raise ClusterarError(
                f"the two stages were trained with different {what}: {coarse_p} with {getattr(cm, key)}, "
                f"{refiner_p} with {getattr(rm, key)}; train both on the same tokenizer and clusters file"
            )
    if not (tokenizer or cm.tokenizer):
        raise ClusterarError(f"--coarse {coarse_p} records no tokenizer; pass --tokenizer")
    tok_path = Path(tokenizer or cm.tokenizer)
    tok = load_checked_tokenizer(tok_path, cm.tokenizer_fingerprint, f"--coarse {coarse_p}")
    tok_path = resolve_tokenizer_path(tok_path)
    cl_path = clusters or cm.clusters
    cl = load_checked_clusters(cl_path, cm.clusters_fingerprint, tok, str(tok_path), f"--coarse {coarse_p}")
    # The architecture checks of the Pipeline constructor, on weightless shells.
    with torch.device("meta"):
        shells = [GPT(m.gpt_config) for m in (cm, rm)]
    Pipeline(
        tok,
        shells[0],
        cm,
        refiner=shells[1],
        refiner_info=rm,
        clusters=cl,
        restrict_to_cluster=True if restrict_to_cluster else None,
        source=str(out),
    )
    base = out.resolve().parent

    def rel(p: str | os.PathLike) -> str:
        return os.path.relpath(Path(p).resolve(), base)

    d = {
        "kind": PIPELINE_KIND,
        "version": PIPELINE_VERSION,
        "method": "ctf",
        "tokenizer": rel(tok_path),
        "tokenizer_fingerprint": cm.tokenizer_fingerprint,
        "clusters": rel(cl_path),
        "clusters_fingerprint": cl.fingerprint(),
        "coarse": rel(coarse_p),
        "refiner": rel(refiner_p),
        "restrict_to_cluster": bool(restrict_to_cluster or rm.restrict_to_cluster),
        "grid": cm.gpt_config.grid_size,
        "num_classes": cm.gpt_config.num_classes,
        "coarse_step": cm.step,
        "refiner_step": rm.step,
    }
    write_json(out, d)
    return d
