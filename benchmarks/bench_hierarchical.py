"""Hierarchical (average-linkage) clusters against k-means: time, peak memory, objective and cluster sizes.

Seeded random unit vectors in 8-D (the shape of LlamaGen's VQ-16 codebook rows) of 4,096 codes (the CPU
tokenizer's codebook), 8,192 and 16,384 (LlamaGen's), cut at the CTF paper's ratio of 32 codes per
cluster. Each clustering runs in a fresh child process, so that its peak resident memory (the condensed
distance matrix: K(K-1)/2 float64s) is measured on its own; k-means runs the same way beside it.

    python benchmarks/bench_hierarchical.py          # about 3 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._results import write_section  # noqa: E402

SIZES = (4096, 8192, 16384)
D, PER_CLUSTER = 8, 32

CHILD = """
import json, sys, time, resource, torch
from clusterar.clusters import CodebookClusters
k, d, n, method = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x = torch.randn(k, d, generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
c = CodebookClusters.fit(x, method, n, seed=0)
seconds = time.perf_counter() - t
sizes = c.sizes
print(json.dumps({"s": seconds, "obj": c.objective, "min": int(sizes.min()), "max": int(sizes.max()),
                  "singletons": int((sizes == 1).sum()), "base_kb": before,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def measure(k: int, method: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(k), str(D), str(k // PER_CLUSTER), method],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = []
    load = os.getloadavg()[0]
    for k in SIZES:
        for method in ("hierarchical", "kmeans"):
            t = time.perf_counter()
            r = measure(k, method)
            r.update(k=k, n=k // PER_CLUSTER, method=method, wall=time.perf_counter() - t)
            rows.append(r)
            print(
                f"K={k} {method}: {r['s']:.2f} s, peak {r['peak_kb'] / 1024:.0f} MiB, objective {r['obj']:.1f}, "
                f"sizes {r['min']}..{r['max']}",
                flush=True,
            )
    lines = [
        "| codes K | clusters | method | time | peak memory (process) | objective (WCSS) | sizes min..max | singletons |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['k']:,} | {r['n']} | {r['method']} | {r['s']:.2f} s | {r['peak_kb'] / 1024:.0f} MiB "
            f"(at start {r['base_kb'] / 1024:.0f}) | {r['obj']:.1f} | {r['min']}..{r['max']} | {r['singletons']} |"
        )
    by = {(r["k"], r["method"]): r for r in rows}
    ratios = ", ".join(
        f"K={k}: {by[k, 'hierarchical']['s'] / by[k, 'kmeans']['s']:.1f}x the time of k-means, objective "
        f"{100 * (by[k, 'hierarchical']['obj'] / by[k, 'kmeans']['obj'] - 1):+.1f}%"
        for k in SIZES
    )
    body = (
        f"Seeded random unit vectors in {D}-D, K codes into K/{PER_CLUSTER} clusters; each clustering in a "
        "fresh process (peak resident memory of that process, which includes PyTorch's own, about the "
        "'at start' figure). hierarchical = `CodebookClusters.fit(x, 'hierarchical', n)` (SciPy's "
        "average linkage on the condensed distances, cut at exactly n clusters); kmeans = the same with "
        "'kmeans' (k-means++ and Lloyd, best of its default 3 restarts). Objective = within-cluster sum of squares of the unit "
        "rows (lower is better: k-means minimises it directly, average linkage does not).\n\n"
        + "\n".join(lines)
        + f"\n\nRatios in this run: {ratios}. Load average when the run started: {load:.2f}."
    )
    write_section(
        "hierarchical",
        "Hierarchical clusters (MASC) vs k-means",
        "python benchmarks/bench_hierarchical.py",
        body,
    )
    print(body)


if __name__ == "__main__":
    main()
