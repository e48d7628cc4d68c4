"""Apply a codebook clustering's permutation to files: tokenizers and token files (IAR's on-disk layout).

IAR trains in a rearranged id space where every cluster is a contiguous block of ids. The permutation
(new_id = perm[old_id]) must then be applied everywhere ids have a meaning: the tokenizer's codebook rows
(new row j = old row inverse[j]), every token file, and the transformer's embedding and output rows
(`permute_rows`). Applied consistently, nothing changes: remapped tokens decoded by the
rearranged tokenizer give bit-identical images (tested).

clusterar's own trainer does not need rearranged files (it remaps ids on the fly); this module is for
users who want IAR's layout on disk. Each rearranged file records the permutation it went through, a file
is never permuted twice, and a rearranged token file names the rearranged tokenizer as its tokenizer, so
the pair checks out against each other exactly like an original pair.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ClusterarError
from ..fileio import atomic_path, read_meta
from ..tokenizer import TOKENIZER_FILE, VQModel, load_tokenizer, resolve_tokenizer_path, save_tokenizer
from ..tokens import TokenFile, write_token_file
from .codebook import CodebookClusters, permute_rows, remap_tokens

CHUNK_IDS = 1 << 24  # ids remapped per step: bounds the int64 temporary of the lookup to 128 MB


def permutation_info(clusters: CodebookClusters) -> dict:
    """What a rearranged file records about the permutation it went through."""
    return {
        "clusters_fingerprint": clusters.fingerprint(),
        "method": clusters.method,
        "n_clusters": clusters.n_clusters,
        "block_size": clusters.block_size,
        "codebook_fingerprint": clusters.codebook_fingerprint,  # of the ORIGINAL codebook
        "clusters_file": clusters.source,
    }


def export_iar_mapping(clusters: CodebookClusters, path: str | os.PathLike) -> Path:
    """Write the permutation in IAR's published format: a 1-D int64 tensor [K] saved with torch.save,
    new_id = mapping[old_id] (equal-size clusters only). Written atomically."""
    mapping = clusters.to_iar_mapping()
    with atomic_path(path) as tmp:
        torch.save(mapping.clone(), tmp)
    return Path(path)


def rearranged_tokenizer(tokenizer: VQModel, clusters: CodebookClusters) -> VQModel:
    """A copy of `tokenizer` (same device) whose codebook rows are in the new id order, so that cluster c
    owns a contiguous block of ids. Refuses clusters computed on another codebook."""
    clusters.check_codebook(tokenizer.quantize.embedding.weight.detach(), "tokenizer's codebook")
    out = copy.deepcopy(tokenizer)
    with torch.no_grad():
        weight = out.quantize.embedding.weight
        weight.copy_(permute_rows(weight.detach().clone(), clusters))
    return out.eval()


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def rearrange_tokenizer_file(
    src: str | os.PathLike, clusters: CodebookClusters, dst: str | os.PathLike
) -> Path:
    """Write the rearranged tokenizer of `src` (a clusterar tokenizer, its run folder, or a LlamaGen .pt) to
    `dst` (a .safetensors file, or a folder that receives tokenizer.safetensors). Returns the file written."""
    src_path = resolve_tokenizer_path(src)
    meta = read_meta(src_path, "tokenizer") if src_path.suffix == ".safetensors" else {}
    if meta.get("permutation"):
        original = meta.get("rearranged_from", "it was made from")
        raise ClusterarError(
            f"{src_path} is already rearranged (by {meta['permutation'].get('method')} clusters "
            f"{meta['permutation'].get('clusters_fingerprint')}); rearrange the original tokenizer "
            f"({original}) instead"
        )
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        dst = dst / TOKENIZER_FILE
    if _same_file(dst, src_path):
        raise ClusterarError(f"--out {dst} is the tokenizer itself; write the rearranged one elsewhere")
    original = load_tokenizer(src_path)
    model = rearranged_tokenizer(original, clusters)
    keep = {k: v for k, v in meta.items() if k not in ("kind", "config", "fingerprint")}  # e.g. eval figures
    keep.update(
        permutation=permutation_info(clusters),
        rearranged_from=str(src_path),
        original_fingerprint=original.fingerprint(),
    )
    save_tokenizer(model, dst, info=keep)
    return dst


def rearrange_token_file(
    src: str | os.PathLike, clusters: CodebookClusters, dst: str | os.PathLike, tokenizer: VQModel
) -> TokenFile:
    """Write a copy of token file `src` with every id remapped (new_id = perm[old_id]) to `dst`.

    `tokenizer` is the ORIGINAL tokenizer that made the tokens: it is checked against the file, and the
    copy records the fingerprints of its rearranged version, which is the tokenizer that decodes the
    copy. Labels, views, dtype and the other metadata are kept.
    """
    src, dst = Path(src), Path(dst)
    tf = TokenFile.open(src)
    if tf.meta.get("permutation"):
        raise ClusterarError(
            f"token file {src} was already remapped (by {tf.meta['permutation'].get('method')} clusters "
            f"{tf.meta['permutation'].get('clusters_fingerprint')}); remap the original token file"
        )
    if tf.meta["codebook_fingerprint"] != clusters.codebook_fingerprint:
        where = f"the clusters in {clusters.source}" if clusters.source else "the clusters"
        raise ClusterarError(
            f"token file {src} was encoded with codebook {tf.meta['codebook_fingerprint']}, but {where} were "
            f"computed on codebook {clusters.codebook_fingerprint}; cluster the tokenizer that made these "
            "tokens"
        )
    tf.check_tokenizer(tokenizer)
    if _same_file(dst, src):
        raise ClusterarError(f"{dst} is the token file itself; write the remapped copy elsewhere")
    new_tokenizer = rearranged_tokenizer(tokenizer, clusters)
    codes = np.empty(tf.codes.shape, tf.codes.dtype)
    rows = max(1, CHUNK_IDS // max(1, tf.num_views * tf.seq_len))
    for i in range(0, len(tf), rows):  # chunks: the file may be far larger than memory for int64 ids
        codes[i : i + rows] = remap_tokens(np.asarray(tf.codes[i : i + rows]), clusters)
    meta = {k: v for k, v in tf.meta.items() if k != "kind"}
    meta.update(
        tokenizer_fingerprint=new_tokenizer.fingerprint(),
        codebook_fingerprint=new_tokenizer.codebook_fingerprint(),
        permutation={
            **permutation_info(clusters),
            "original_tokenizer_fingerprint": tf.meta["tokenizer_fingerprint"],
        },
    )
    write_token_file(dst, codes, np.asarray(tf.labels), meta)
    return TokenFile.open(dst)


def rearrange_token_files(
    srcs: Sequence[str | os.PathLike],
    clusters: CodebookClusters,
    out_dir: str | os.PathLike,
    tokenizer: VQModel,
) -> list[TokenFile]:
    """Remap several token files into `out_dir`, each under its own file name."""
    out_dir = Path(out_dir)
    names = [Path(s).name for s in srcs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ClusterarError(
            f"token files {dup} share a file name and would overwrite each other in {out_dir}; "
            "rearrange them into separate --out-dir folders"
        )
    for s in srcs:
        if _same_file(Path(s).parent, out_dir):
            raise ClusterarError(
                f"--out-dir {out_dir} holds the token file {s} itself; choose another folder for the copies"
            )
    return [rearrange_token_file(s, clusters, out_dir / Path(s).name, tokenizer) for s in srcs]
