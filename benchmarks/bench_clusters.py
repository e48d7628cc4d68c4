"""Balanced k-means (ours) against IAR's greedy script, and k-means for CTF, on a codebook-sized problem.

16384 seeded random unit vectors in 8-D (the shape of LlamaGen's VQ-16 codebook) into 128, 512 and 1024
equal-size clusters. Both methods run in the same process, so the ratios compare like with like. IAR's
greedy baseline takes seconds per iteration; it runs its full 100 iterations at 128 clusters, and a few
at 512 and 1024, where its 100-iteration time is extrapolated from the measured per-iteration time (and
labelled so). Its 100-iteration objective there comes from the same greedy with numpy loops, which makes
identical decisions (checked on the iterations both ran) about 20x faster.

    python benchmarks/bench_clusters.py            # about 6 minutes on 2 cores
    python benchmarks/bench_clusters.py --quick    # baseline limited to 2 iterations everywhere
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from clusterar.clusters import balanced_kmeans, kmeans

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._results import write_section  # noqa: E402
from benchmarks.iar_reference import iar_greedy_balanced_kmeans  # noqa: E402

K, D, FULL = 16384, 8, 100


def unit_vectors(seed: int = 0) -> torch.Tensor:
    x = torch.randn(K, D, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def describe(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, n: int) -> dict:
    """Sizes, and the fraction of codes whose nearest centre is not their own."""
    sizes = torch.bincount(labels, minlength=n)
    nearest = torch.cdist(x.double(), centres.double()).argmin(1)
    return {
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "off": float((nearest != labels).float().mean()),
    }


def run(n: int, baseline_iters: int, x: torch.Tensor, repeats: int) -> dict:
    row: dict = {"n": n}
    times = []
    for _ in range(repeats):  # deterministic: the same result every time, only the clock varies
        info: dict = {}
        t = time.perf_counter()
        labels, centres, obj = balanced_kmeans(x, n, seed=0, info=info)
        times.append(time.perf_counter() - t)
    seconds = sorted(times)[len(times) // 2]
    row["ours"] = {"s": seconds, "obj": obj, "iters": info["iters"], **describe(x, labels, centres, n)}
    print(f"n={n} ours: {row['ours']['s']:.2f}s objective {obj:.2f}", flush=True)

    info = {}
    labels, centres, obj = iar_greedy_balanced_kmeans(x, n, iters=baseline_iters, seed=0, info=info)
    per_iter = info["seconds"] / info["iters"]
    row["greedy"] = {"iters": info["iters"], "per_iter": per_iter, "s100": per_iter * FULL}
    row["greedy"]["measured"] = info["iters"] >= FULL
    print(f"n={n} IAR greedy: {info['iters']} iterations, {per_iter:.2f}s each", flush=True)
    if row["greedy"]["measured"]:
        row["greedy"].update(obj=obj, **describe(x, labels, centres, n))
        same = iar_greedy_balanced_kmeans(x, n, iters=2, seed=0, fast_loops=True)[0]
        ref = iar_greedy_balanced_kmeans(x, n, iters=2, seed=0)[0]
        info = {}
        iar_greedy_balanced_kmeans(x, n, iters=FULL, seed=0, fast_loops=True, info=info)
    else:
        ref = labels
        same = iar_greedy_balanced_kmeans(x, n, iters=info["iters"], seed=0, fast_loops=True)[0]
        info = {}
        labels, centres, obj = iar_greedy_balanced_kmeans(
            x, n, iters=FULL, seed=0, fast_loops=True, info=info
        )
        row["greedy"].update(obj=obj, **describe(x, labels, centres, n))
    if not torch.equal(same, ref):
        raise SystemExit("the numpy-loop greedy made different decisions from the faithful one")
    row["greedy"]["fast_s100"] = info["seconds"]
    print(f"n={n} IAR greedy, numpy loops: {info['seconds']:.1f}s for {FULL} iterations", flush=True)
    return row


def table(rows: list[dict], km: dict, args: argparse.Namespace, load: tuple[float, float, float]) -> str:
    lines = [
        f"{K} seeded random unit vectors in {D}-D into n equal-size clusters ({K}/n codes each); ours is "
        "`balanced_kmeans` (k-means++ and plain Lloyd warm-up, then exact equal-size assignments by "
        "negative-cycle cancelling, iterated to a fixed point); the baseline is `iar_greedy_balanced_kmeans`, "
        f"a faithful re-implementation of IAR's script ({FULL} iterations of a greedy assignment in Python "
        f"loops). Both in the same run, {torch.get_num_threads()} threads; ours is the median of "
        f"{args.repeats} runs (it is deterministic), the baseline runs once. Objective = within-cluster sum of "
        "squares (lower is better); 'off nearest' = codes whose nearest centre is not their own.",
        "",
        "| n | method | wall time | objective | sizes min..max | off nearest | speed-up |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, g = r["ours"], r["greedy"]
        if g["measured"]:
            gtime = f"{g['s100']:.1f} s (measured, {FULL} it.)"
        else:
            gtime = f"{g['s100']:.0f} s (extrapolated: {g['iters']} it. measured, {g['per_iter']:.2f} s each)"
        lines += [
            f"| {r['n']} | ours ({o['iters']} it., converged) | {o['s']:.2f} s | {o['obj']:.2f} | "
            f"{o['min']}..{o['max']} | {o['off']:.1%} | {g['s100'] / o['s']:.0f}x |",
            f"| {r['n']} | IAR greedy | {gtime} | {g['obj']:.2f} | {g['min']}..{g['max']} | {g['off']:.1%} | 1x |",
            f"| {r['n']} | IAR greedy, numpy loops (same decisions) | {g['fast_s100']:.1f} s | {g['obj']:.2f} | "
            f"{g['min']}..{g['max']} | {g['off']:.1%} | {g['s100'] / g['fast_s100']:.0f}x |",
        ]
    lines += [
        "",
        "Objective difference, ours vs greedy: "
        + ", ".join(f"n={r['n']}: {(r['ours']['obj'] / r['greedy']['obj'] - 1):+.2%}" for r in rows)
        + ". Ours against the numpy-loop greedy: "
        + ", ".join(f"n={r['n']}: {r['greedy']['fast_s100'] / r['ours']['s']:.1f}x faster" for r in rows)
        + ".",
        "",
        f"k-means (CTF) {K}x{D} -> 512 clusters, `kmeans(n_init={km['n_init']})` (median of {args.repeats} "
        f"runs): {km['s']:.2f} s, objective "
        f"{km['obj']:.2f}, sizes {km['min']}..{km['max']}, {km['iters']} Lloyd iterations in all.",
        "",
        f"Load average when the run started: {load[0]:.2f} (the machine is shared; other jobs slow both sides).",
    ]
    if args.quick:
        lines.append("Quick run: the baseline ran 2 iterations at every n; its times are extrapolated.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="limit the baseline to 2 iterations everywhere")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--sizes", default="128,512,1024", help="cluster counts (default 128,512,1024)")
    ap.add_argument("--baseline-iters", type=int, default=3, help="baseline iterations above 128 clusters")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median reported)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    x = unit_vectors()
    balanced_kmeans(x[:2048], 16)  # warm up torch's kernels and thread pool before any clock runs
    kmeans(x[:2048], 16)
    iar_greedy_balanced_kmeans(x[:256], 4, iters=1)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        iters = 2 if args.quick else FULL if n <= 128 else args.baseline_iters
        rows.append(run(n, iters, x, args.repeats))

    times = []
    for _ in range(args.repeats):
        info: dict = {}
        t = time.perf_counter()
        labels, centres, obj = kmeans(x, 512, seed=0, info=info)
        times.append(time.perf_counter() - t)
    km = {
        "s": sorted(times)[len(times) // 2],
        "obj": obj,
        "n_init": len(info["runs"]),
        "iters": info["iters"],
    }
    km.update(describe(x, labels, centres, 512))
    print(f"k-means 512: {km['s']:.2f}s objective {obj:.2f}", flush=True)

    body = table(rows, km, args, load)
    print(body)
    if not args.no_write:
        command = "python benchmarks/bench_clusters.py" + (" --quick" if args.quick else "")
        write_section(
            "clusters", "Codebook clustering: balanced k-means vs IAR's greedy script", command, body
        )


if __name__ == "__main__":
    main()
