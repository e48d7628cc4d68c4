"""The pipeline's stages, each written once; the command line and the experiment runner both call them.

    images --encode_splits--> token files          (clusterar encode,      experiment stage 2)
    codebook --fit_clusters--> clusters file       (clusterar cluster fit, experiment stage 3)
    token files --clusterar.train.train--> models  (clusterar train,       experiment stage 4)
    model --sample_model--> sample folder (npz)    (clusterar sample,      experiment stages 5-6)
    npz --clusterar.metrics.evaluate_images--> FID, IS, precision/recall, class accuracy

A stage takes paths and settings and writes its result; the callers add what is theirs: the command line
its flags and printed lines, the runner its caching by settings (clusterar.experiment.runner).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .clusters import CodebookClusters
from .errors import ClusterarError
from .runtime import pick_device
from .sample import Pipeline, SampleSettings, describe_settings, make_labels, sample_to_folder
from .tokenizer import load_tokenizer, tokenizer_fingerprint
from .tokens import VIEW_NAMES, TokenFile, encode_dataset, resolve_views


def encode_splits(
    tokenizer: str | Path,
    data: str,
    views: dict[str, str],
    out: str | Path,
    *,
    image_size: int = 32,
    batch_size: int = 128,
    num_workers: int = 0,
    on_error: str = "fail",
    save_every: float = 30.0,
    device: str = "auto",
    reuse: bool = False,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Path]:
    """Encode each split of `data` (`views`: split -> views) into OUT/SPLIT.safetensors.

    reuse: keep a split's file when this tokenizer made it with these views (the runner; the command line
    always encodes, continuing an interrupted file from its partial save). rank / world: this process of a
    torchrun job (torch.distributed initialised); the processes share every split and write one file.
    """
    model = None
    fp = tokenizer_fingerprint(tokenizer) if reuse else None  # once: a LlamaGen .pt is loaded to hash it
    paths: dict[str, Path] = {}
    for split, split_views in views.items():
        path = Path(out) / f"{split}.safetensors"
        paths[split] = path
        if reuse and path.exists():
            meta = TokenFile.open(path).meta
            want = VIEW_NAMES[resolve_views(data, split_views)]
            if meta["tokenizer_fingerprint"] == fp and meta["views"] == want:
                print(f"tokens: reusing {path}")
                continue
        if model is None:
            model = load_tokenizer(tokenizer, pick_device(device))
        if reuse:
            print(f"tokens: encoding {data} {split}")
        tf = encode_dataset(
            model,
            data,
            split,
            path,
            image_size=image_size,
            views=split_views,
            batch_size=batch_size,
            num_workers=num_workers,
            on_error=on_error,
            progress=progress,
            save_every=save_every,
            rank=rank,
            world=world,
        )
        if not reuse and rank == 0:
            print(
                f"{tf.path}: codes {list(tf.codes.shape)} {tf.codes.dtype}, {len(tf.meta['skipped'])} skipped"
            )
    return paths


def fit_clusters(
    tokenizer: str | Path,
    method: str | None,
    n: int,
    *,
    seed: int = 0,
    restarts: int | None = None,
    from_iar: str | Path | None = None,
    device: str = "cpu",
):
    """Cluster a tokenizer's codebook into `n` clusters (kmeans, balanced or random), or import IAR's
    permutation file (`from_iar`, blocks of K / n ids). Returns the CodebookClusters and a record:
    objective, smallest and largest cluster, seconds, and the solver's own figures (`info`)."""
    if restarts is not None and method not in ("kmeans", "balanced"):
        raise ClusterarError("--restarts applies to --method kmeans and balanced only")
    codebook = load_tokenizer(tokenizer).quantize.embedding.weight.detach()
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    if from_iar is not None:
        k = codebook.shape[0]
        if n < 1 or k % n:
            raise ClusterarError(
                f"--clusters {n} does not split the tokenizer's {k} codes into equal blocks; "
                "IAR's file holds blocks of K / M ids (its release: --clusters 128 for 16384 codes)"
            )
        clusters = CodebookClusters.from_iar_mapping(from_iar, codebook, k // n)
    else:
        kw: dict[str, Any] = {} if restarts is None else {"n_init": restarts}
        if method != "random":
            kw["info"] = info
        clusters = CodebookClusters.fit(codebook.to(pick_device(device)), method, n, seed=seed, **kw)
    sizes = clusters.sizes
    record = {
        "objective": clusters.objective,
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "seconds": round(time.perf_counter() - t0, 1),
        "info": info,
    }
    return clusters, record


def sample_model(
    source: str | Path,
    out: str | Path,
    *,
    n: int,
    seed: int = 0,
    per_class: bool = False,
    labels: list[int] | None = None,
    settings: dict[str, Any] | None = None,
    method: str | None = None,
    batch_size: int = 64,
    compile: bool | None = None,
    write_images: bool = True,
    device: str = "auto",
    tokenizer: str | None = None,
    clusters: str | None = None,
    restrict_to_cluster: bool | None = None,
    grid_size: int | None = None,
    announce: bool = False,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Sample `n` class-conditional images of a model or pipeline into the resumable folder `out`
    (grid.png, images/, samples.npz in ADM's format, sample.json); return sample.json's summary.

    settings: overrides of the method's sampling defaults (SampleSettings.for_method); `method` names the
    method whose defaults apply when it is known beforehand (the runner), else the source's own.
    rank / world: this process of a torchrun job; the processes share the batches (sample_to_folder).
    """
    pipe = Pipeline.load(
        source,
        device=pick_device(device),
        tokenizer=tokenizer,
        clusters=clusters,
        restrict_to_cluster=restrict_to_cluster,
        grid_size=grid_size,
    )
    s = SampleSettings.for_method(method or pipe.method, **(settings or {}))
    chosen, how = make_labels(n, pipe.num_classes, per_class=per_class, labels=labels, seed=seed)
    if announce and rank == 0:
        print(f"{pipe.method} from {pipe.source} on {pipe.device}: {n} images, labels {how}")
        print(f"settings: {describe_settings(s, pipe.method)}")
    return sample_to_folder(
        pipe,
        chosen,
        out,
        settings=s,
        seed=seed,
        batch_size=batch_size,
        compile=compile,
        per_class=per_class,
        write_images=write_images,
        progress=progress,
        info={"labels_how": how},
        rank=rank,
        world=world,
    )
