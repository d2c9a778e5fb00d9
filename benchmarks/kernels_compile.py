"""Resources of the Triton kernels compiled for a GPU target, on a machine without a GPU.

Compiles every launch of PATT's forward and backward (ViT-B qkv, d = 768) for ``sm_<arch>``
with :mod:`vpetl.kernels.aot` and reads each cubin's registers per thread, stack and spill
(local) bytes and its shared memory. Compiling is not timing: this says the kernels build for
the GPU and whether a configuration spills or cannot fit, not how fast they run
(``benchmarks/kernels.py --device cuda`` does that, on a GPU).

With ``--grouped``, the grouped kernels of many tasks' PATT on one projection instead (8 tasks,
8 ViT-B images routed round-robin, every third on the plain base).

Usage:
    python benchmarks/kernels_compile.py              # sm_90 (H100)
    python benchmarks/kernels_compile.py --arch 80    # sm_80 (A100)
    python benchmarks/kernels_compile.py --suffix _triton3.8   # another Triton release beside
    python benchmarks/kernels_compile.py --grouped    # the grouped kernels
Writes benchmarks/results/kernels_compile[_grouped]_sm<arch><suffix>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
from pathlib import Path

import torch
import triton

import vpetl
from provenance import describe, git_state
from vpetl.kernels import aot

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TILE_KEYS = ("BM", "BN", "BK", "BR", "BP", "num_warps", "num_stages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(aot.SHARED_LIMIT))
    parser.add_argument("--ranks", default="16,32,64,128,256", help="comma-separated PATT ranks")
    parser.add_argument("--suffix", default="", help="appended to the output name, e.g. _triton3.8 for another release")
    parser.add_argument("--grouped", action="store_true", help="the grouped kernels (many tasks) instead")
    args = parser.parse_args()
    reason = aot.aot_supported()
    if reason:
        raise SystemExit(f"kernels_compile.py: cannot compile ahead of time here: {reason}")
    limit = aot.SHARED_LIMIT[args.arch]
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for rank in (int(r) for r in args.ranks.split(",")):
            for launch in (aot.grouped_launches if args.grouped else aot.patt_launches)(dtype, rank):
                for i, kwargs in enumerate(launch.variants()):
                    compiled = aot.compile_launch(launch, args.arch, i)
                    rows.append({
                        "kernel": launch.name.strip("_"), "dtype": dtype_name, "rank": rank,
                        "tiles": {k: kwargs[k] for k in TILE_KEYS if k in kwargs},
                        "shared_bytes": compiled.metadata.shared, "fits": compiled.metadata.shared <= limit,
                        **aot.resource_usage(compiled),
                    })
                    print(f"{dtype_name} r={rank} {rows[-1]['kernel']} {rows[-1]['tiles']}: "
                          f"shared {compiled.metadata.shared} B, {aot.resource_usage(compiled)}", flush=True)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "target": f"sm_{args.arch}",
        "shared_limit_bytes": limit, "triton": triton.__version__, "torch": torch.__version__,
        "vpetl": vpetl.__version__, "python": platform.python_version(), "compiled_on": platform.machine(),
        "problem": ("grouped PATT of 8 tasks on K/V of a d=768 qkv projection, 8 x 197 tokens, forward + backward"
                    if args.grouped else "PATT on K/V of a d=768 qkv projection, 394 tokens, forward + backward"),
        **git_state(),
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"kernels_compile{'_grouped' if args.grouped else ''}_sm{args.arch}{args.suffix}"  # the suffix may hold a dot: no with_suffix
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Triton kernels compiled for {meta['target']} (no GPU used)",
        "",
        f"{meta['date']}, Triton {meta['triton']}, torch {meta['torch']}, {describe(meta)}; {meta['problem']}. "
        f"Registers/stack/local from the cubin (`cuobjdump -res-usage`); a stack frame > 0 B usually holds spilled registers. "
        f"Shared memory limit per block: {limit} B. Autotuned kernels list every configuration the "
        "autotuner tries; it drops those that do not fit.",
        "",
        "| kernel | dtype | r | tiles | shared B | fits | regs | stack B | local B |",
        "|---|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        tiles = " ".join(f"{k}={v}" for k, v in row["tiles"].items())
        lines.append(f"| {row['kernel']} | {row['dtype']} | {row['rank']} | {tiles} | {row['shared_bytes']} | "
                     f"{'yes' if row['fits'] else 'no'} | {row.get('reg', '-')} | {row.get('stack', '-')} | "
                     f"{row.get('local', '-')} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and .md ({len(rows)} compiled configurations)")


if __name__ == "__main__":
    main()
