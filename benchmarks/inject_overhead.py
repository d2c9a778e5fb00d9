"""Inference cost of an injected model relative to its base, next to the FLOP-ideal ratio.

The side branches add a few percent of FLOPs (DESIGN.md §4); the torch path should cost close
to that. Models are timed interleaved, in a fresh random order every round (so no model always
runs right after another), and the median per-round ratio to the base is reported with its
interquartile range, since ratios hold on noisy machines and absolute times do not.

Usage:
    python benchmarks/inject_overhead.py                       # ViT-S/16, batch 8, CPU
    python benchmarks/inject_overhead.py --model vit_base_patch16_224 --batch 64 --device cuda

Writes benchmarks/results/inject_overhead_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn

import vpetl
from provenance import describe, git_state

METHODS = [("bapat", 64), ("bapat", 128), ("patt", 64), ("adapter", None), ("lora", None)]
RESULTS = Path(__file__).resolve().parent / "results"


def flop_ratio(base: nn.Module, injected: nn.Module, images: torch.Tensor) -> float:
    """FLOPs of the injected forward / the base's. The base is counted with torch's FLOP
    counter (attention matmuls included); the branches analytically, 2 FLOPs per weight
    element per token, since every branch weight multiplies every token once (ViT)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        base(images)
    tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    branch_weights = sum(
        p.numel() for n, p in injected.named_parameters() if "vpetl_" in n and n.endswith("weight")
    )
    return 1 + 2 * tokens * branch_weights * images.shape[0] / counter.get_total_flops()


def time_interleaved(models: dict[str, nn.Module], images: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in models}
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(images)
        order = list(models)
        shuffler = random.Random(0)
        for _ in range(repeats):
            shuffler.shuffle(order)
            for name in order:
                model = models[name]
                sync()
                start = time.perf_counter()
                model(images)
                sync()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--suffix", default="", help="appended to the result files' names (e.g. _malloc)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=10).eval().to(args.device)
    models: dict[str, nn.Module] = {"base": base}
    for method, width in METHODS:
        name = f"{method}-{width}" if width else method
        models[name] = vpetl.inject(copy.deepcopy(base), method, d_bottle=width).eval()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    images = torch.randn(args.batch, 3, 224, 224, device=args.device)
    for name, model in models.items():
        if model is not base:
            vpetl.verify(model, images[:1])  # every branch is really in the timed forward

    flops = {name: flop_ratio(base, model, images[:1]) for name, model in models.items()}
    times = time_interleaved(models, images, args.repeats)
    base_times = times["base"]
    rows = []
    for name, samples in times.items():
        ratios = [t / b for t, b in zip(samples, base_times)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        rows.append({
            "method": name,
            "median_ms": 1e3 * statistics.median(samples),
            "ratio_to_base": statistics.median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "flop_ratio": flops[name],
            "trainable": None if name == "base" else vpetl.summary(models[name]).trainable,
        })

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "timm": timm.__version__, "vpetl": vpetl.__version__,
        "python": platform.python_version(), "model": args.model, "batch": args.batch,
        "repeats": args.repeats, "load_average_start": load_start, **git_state(),
        # glibc returns freed large blocks to the OS; page faults then inflate CPU times
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"inject_overhead_{args.device.split(':')[0]}{args.suffix}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# Inference overhead of injected models ({args.model}, batch {args.batch}, {meta['device_name']})",
        "",
        f"{meta['date']}, torch {meta['torch']}, timm {meta['timm']}, {describe(meta)}, "
        f"{meta['cpu_threads']} CPU threads, median of {args.repeats} interleaved rounds (random order "
        f"per round), load average {load_start if load_start is None else f'{load_start:.1f}'} at the start, "
        f"malloc settings {meta['malloc_env'] or 'glibc defaults'}.",
        "",
        "| method | trainable | median ms | time / base | IQR of time / base | FLOPs / base |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        trainable = f"{row['trainable']:,}" if row["trainable"] else "-"
        lines.append(
            f"| {row['method']} | {trainable} | {row['median_ms']:.1f} | {row['ratio_to_base']:.3f} | "
            f"{row['ratio_q1']:.3f}–{row['ratio_q3']:.3f} | {row['flop_ratio']:.3f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
