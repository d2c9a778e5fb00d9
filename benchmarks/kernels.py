"""One attention projection with PATT (and one MLP with the adapter): frozen base alone vs the
unfused reference branch (as the paper's code) vs the vpetl torch path (and the alternative
torch formulation measured against it) vs the vpetl Triton kernels.

Shapes: ViT-B (d = 768, 197 tokens) and the four Swin-B stages (d = 128/256/512/1024, 7x7
windows at 224 px: 3136/784/196/49 tokens per image), PATT r = 32/64/128/256 on K and V.
Modes: forward (inference, no autograd) and forward+backward (frozen base weights; the input
and the branch need gradients, as in every block after the first of a PETL model).

Variants are timed interleaved (A, B, C, ... repeated); the reported ratio is the fastest
sample of a variant over the fastest sample of the frozen projection (on a shared machine
interference only ever adds time, so minima are the stable statistic); the JSON also keeps
medians and the median of per-repeat ratios.

Usage:
    python benchmarks/kernels.py                         # CPU: small batches, torch variants
    python benchmarks/kernels.py --device cuda           # GPU: ViT-B batch 64, Triton included

Writes benchmarks/results/kernels_<device>.json and .md. On a CPU the Triton kernels only run
in the interpreter, whose timings mean nothing: they are listed as not measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import vpetl
from vpetl.methods.adapter import AdapterBranch
from vpetl.methods.patt import PattBranch
from vpetl.config import AdapterConfig, Kernel, PattConfig
from vpetl.projection import SlotLayout, project, project_generic

RESULTS = Path(__file__).resolve().parent / "results"
RANKS = (32, 64, 128, 256)
# (name, width, tokens per image): ViT-B/16 at 224, Swin-B stages at 224 (tokens = windows x 49)
SHAPES = [("vit_b", 768, 197), ("swin_b.s1", 128, 3136), ("swin_b.s2", 256, 784),
          ("swin_b.s3", 512, 196), ("swin_b.s4", 1024, 49)]
SCALE = 0.8


# ----------------------------------------------------------------------------- problems


class PattProblem:
    """Frozen qkv ``(3d, d)`` + bias, one PATT-r branch on K and V, an input ``(M, d)``."""

    def __init__(self, m: int, d: int, r: int, dtype: torch.dtype, device: str, grad: bool):
        gen = torch.Generator().manual_seed(0)

        def rand(*shape, std=1.0):
            return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

        self.x = rand(m, d).requires_grad_(grad)
        self.weight, self.bias = rand(3 * d, d, std=d**-0.5), rand(3 * d, std=0.02)
        self.branch = PattBranch(d, {"k": d, "v": d}, PattConfig(d_bottle=r, scale=SCALE), bias=True)
        self.branch.to(device=device, dtype=dtype).requires_grad_(grad)
        self.grad = rand(m, 3 * d)
        self.d = d
        self.layout = SlotLayout("qkv")

    # each variant returns (outputs, their incoming gradients)
    def frozen(self):
        return (F.linear(self.x, self.weight, self.bias),), (self.grad,)

    def reference(self):
        """The paper's code: qkv, then K/V replaced by new tensors ``k + s*K_p``, ``v + s*V_p``."""
        d, b = self.d, self.branch
        qkv = F.linear(self.x, self.weight, self.bias)
        kv = b.up(torch.tanh(b.down(self.x))) * SCALE
        q, k, v = qkv[:, :d], qkv[:, d : 2 * d] + kv[:, :d], qkv[:, 2 * d :] + kv[:, d:]
        return (q, k, v), tuple(self.grad.split(d, dim=1))

    def vpetl(self, kernel: Kernel):
        return (project(self.x, self.weight, self.bias, self.layout, [self.branch], kernel),), (self.grad,)

    def generic(self):
        """The previous torch path: ``F.linear`` then ``addmm_`` into the K/V slice, differentiated
        by autograd (whose ``CopySlices`` clones the whole output gradient)."""
        return (project_generic(self.x, self.weight, self.bias, self.layout, [self.branch]),), (self.grad,)

    def concat(self):
        """Alternative torch path: one GEMM for ``[W ; W_down]`` (the frozen rows get a weight
        gradient through the concatenation in training), then ``addmm_`` into the K/V slice."""
        d, b = self.d, self.branch
        weight = torch.cat([self.weight, b.down.weight])
        bias = torch.cat([self.bias.index_add(0, torch.arange(d, 3 * d, device=self.bias.device),
                                              b.up.bias * SCALE), b.down.bias])
        y = F.linear(self.x, weight, bias)
        h = torch.tanh(y[:, 3 * d :])
        out = y[:, : 3 * d]
        out[:, d:].addmm_(h, b.up.weight.t(), alpha=SCALE)
        return (out,), (self.grad,)


class AdapterProblem:
    """A frozen ViT MLP ``d -> 4d -> d`` (GELU) with the parallel adapter-64 beside it."""

    def __init__(self, m: int, d: int, dtype: torch.dtype, device: str, grad: bool):
        gen = torch.Generator().manual_seed(0)

        def rand(*shape, std=1.0):
            return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

        self.x = rand(m, d).requires_grad_(grad)
        self.fc1, self.b1 = rand(4 * d, d, std=d**-0.5), rand(4 * d, std=0.02)
        self.fc2, self.b2 = rand(d, 4 * d, std=(4 * d) ** -0.5), rand(d, std=0.02)
        self.adapter = AdapterBranch(d, AdapterConfig()).to(device=device, dtype=dtype).requires_grad_(grad)
        torch.nn.init.normal_(self.adapter.up.weight, std=0.02)
        self.grad = rand(m, d)

    def mlp(self):
        return F.linear(F.gelu(F.linear(self.x, self.fc1, self.b1)), self.fc2, self.b2)

    def frozen(self):
        return (self.mlp(),), (self.grad,)

    def reference(self):
        a = self.adapter
        return (self.mlp() + a.up(F.relu(a.down(self.x))) * a.scale,), (self.grad,)

    def vpetl(self, kernel: Kernel):
        return (self.adapter.add_to(self.mlp(), self.x, kernel),), (self.grad,)


# ----------------------------------------------------------------------------- timing


def _step(fn: Callable, backward: bool) -> None:
    outs, grads = fn()
    if backward:
        torch.autograd.backward(outs, grads)


def time_interleaved(variants: dict[str, Callable], backward: bool, repeats: int, inner: int, device: str):
    """Median seconds per call of each variant and median ratio to the first one."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ctx = torch.enable_grad if backward else torch.inference_mode
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with ctx():
        for fn in variants.values():  # warm-up (and Triton compile/autotune)
            for _ in range(2):
                _step(fn, backward)
        sync()
        for _ in range(repeats):
            for name, fn in variants.items():
                sync()
                start = time.perf_counter()
                for _ in range(inner):
                    _step(fn, backward)
                sync()
                samples[name].append((time.perf_counter() - start) / inner)
    first = next(iter(samples.values()))
    return {
        name: {"ms": 1e3 * statistics.median(s), "min_ms": 1e3 * min(s), "ratio": min(s) / min(first),
               "median_ratio": statistics.median(a / b for a, b in zip(s, first))}
        for name, s in samples.items()
    }


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 GPU)")
    parser.add_argument("--batch", type=int, default=None, help="images for ViT-B (default: 64 GPU, 2 CPU)")
    parser.add_argument("--swin-batch", type=int, default=None,
                        help="images for Swin-B stages (default: 16 GPU, 1 CPU)")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--shapes", default=None, help="comma-separated names from " + ",".join(s[0] for s in SHAPES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--model-overhead", action="store_true",
                        help="also time BAPAT-64 on ViT-S/16 against its base (inference, as inject_overhead.py)")
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--model-repeats", type=int, default=11)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    batch = args.batch or (64 if gpu else 2)
    swin_batch = args.swin_batch or (16 if gpu else 1)
    repeats = args.repeats or (15 if gpu else 9)
    inner = 10 if gpu else 1
    ranks = [int(r) for r in args.ranks.split(",")]
    shapes = [s for s in SHAPES if args.shapes is None or s[0] in args.shapes.split(",")]
    triton = gpu and vpetl.kernels.triton_available()

    rows = []
    for name, d, tokens in shapes:
        m = tokens * (batch if name == "vit_b" else swin_batch)
        for r in ranks:
            for backward in (False, True):
                p = PattProblem(m, d, r, dtype, args.device, grad=backward)
                variants = {"frozen qkv": p.frozen, "reference (unfused)": p.reference,
                            "vpetl torch": lambda p=p: p.vpetl(Kernel.TORCH),
                            "alt: autograd addmm_": p.generic, "alt: concat [W; W_down]": p.concat}
                if triton:
                    variants["vpetl triton"] = lambda p=p: p.vpetl(Kernel.TRITON)
                res = time_interleaved(variants, backward, repeats, inner, args.device)
                rows.append({"op": "patt-qkv", "shape": name, "d": d, "m": m, "r": r,
                             "mode": "fwd+bwd" if backward else "fwd", "results": res})
                print(name, d, m, r, rows[-1]["mode"], {k: round(v["ratio"], 3) for k, v in res.items()}, flush=True)
    for name, d, tokens in shapes[:1]:  # adapter-64 beside a ViT-B MLP
        m = tokens * batch
        for backward in (False, True):
            p = AdapterProblem(m, d, dtype, args.device, grad=backward)
            variants = {"frozen mlp": p.frozen, "reference (unfused)": p.reference,
                        "vpetl torch": lambda p=p: p.vpetl(Kernel.TORCH)}
            if triton:
                variants["vpetl triton"] = lambda p=p: p.vpetl(Kernel.TRITON)
            res = time_interleaved(variants, backward, repeats, inner, args.device)
            rows.append({"op": "adapter-mlp", "shape": name, "d": d, "m": m, "r": 64,
                         "mode": "fwd+bwd" if backward else "fwd", "results": res})
            print("adapter", name, rows[-1]["mode"], {k: round(v["ratio"], 3) for k, v in res.items()}, flush=True)

    overhead = None
    if args.model_overhead:
        overhead = model_overhead(args.device, args.model_batch, args.model_repeats)

    import triton as _triton  # noqa: F401 - versions only

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "triton": _triton.__version__, "vpetl": vpetl.__version__,
        "python": platform.python_version(), "vit_batch": batch, "swin_batch": swin_batch,
        "repeats": repeats, "calls_per_sample": inner, "scale": SCALE,
        "triton_measured": triton,
        "note": None if triton else "Triton not measured (no GPU: the interpreter's timings mean nothing)",
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"kernels_{args.device.split(':')[0]}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "model": overhead}, indent=2) + "\n")
    text = markdown(meta, rows, overhead)
    stem.with_suffix(".md").write_text(text)
    print(text)


def model_overhead(device: str, batch: int, repeats: int) -> dict:
    """Inference time of ViT-S/16 with BAPAT-64 (kernel "auto") over the base model, median
    of interleaved repeats; the timing helper of ``inject_overhead.py``."""
    import copy
    import importlib.util

    import timm

    spec = importlib.util.spec_from_file_location("inject_overhead", Path(__file__).with_name("inject_overhead.py"))
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10).eval().to(device)
    model = vpetl.inject(copy.deepcopy(base), "bapat", d_bottle=64).eval()
    images = torch.randn(batch, 3, 224, 224, device=device)
    vpetl.verify(model, images[:1])
    times = helper.time_interleaved({"base": base, "bapat-64": model}, images, repeats)
    ratios = [t / b for t, b in zip(times["bapat-64"], times["base"])]
    return {"model": "vit_small_patch16_224", "method": "bapat-64", "batch": batch, "repeats": repeats,
            "base_ms": 1e3 * statistics.median(times["base"]), "bapat_ms": 1e3 * statistics.median(times["bapat-64"]),
            "ratio": statistics.median(ratios), "flop_ratio": helper.flop_ratio(base, model, images[:1])}


def markdown(meta: dict, rows: list[dict], overhead: dict | None = None) -> str:
    names = []
    for row in rows:
        for n in row["results"]:
            if n not in names and row["op"] == "patt-qkv":
                names.append(n)
    if not meta["triton_measured"]:
        names.append("vpetl triton")
    lines = [
        f"# PATT projection kernels ({meta['device_name']}, {meta['dtype']})",
        "",
        f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, vpetl {meta['vpetl']}, "
        f"{meta['cpu_threads']} CPU threads; ViT-B batch {meta['vit_batch']}, Swin-B batch {meta['swin_batch']}; "
        f"{meta['repeats']} interleaved repeats ({meta['calls_per_sample']} calls each); "
        "ratios of the fastest samples.",
        "",
        "Time of one qkv projection with PATT-r on K and V, as a ratio to the frozen qkv projection alone "
        "(forward: inference; fwd+bwd: frozen base, gradients for the input and the branch).",
        "",
        "| shape | tokens M | r | mode | frozen ms (min) | " + " | ".join(names[1:]) + " |",
        "|---|---:|---:|---|---:|" + "---:|" * (len(names) - 1),
    ]
    for row in rows:
        if row["op"] != "patt-qkv":
            continue
        res = row["results"]
        cells = [f"{res[n]['ratio']:.3f}" if n in res else "not measured (no GPU)" for n in names[1:]]
        lines.append(f"| {row['shape']} (d={row['d']}) | {row['m']} | {row['r']} | {row['mode']} | "
                     f"{res[names[0]]['min_ms']:.2f} | " + " | ".join(cells) + " |")
    adapter = [row for row in rows if row["op"] == "adapter-mlp"]
    if adapter:
        anames = list(adapter[0]["results"])
        if not meta["triton_measured"]:
            anames.append("vpetl triton")
        lines += [
            "",
            "Adapter-64 beside a frozen ViT-B MLP (d -> 4d -> d), as a ratio to the MLP alone:",
            "",
            "| tokens M | mode | MLP ms (min) | " + " | ".join(anames[1:]) + " |",
            "|---:|---|---:|" + "---:|" * (len(anames) - 1),
        ]
        for row in adapter:
            res = row["results"]
            cells = [f"{res[n]['ratio']:.3f}" if n in res else "not measured (no GPU)" for n in anames[1:]]
            lines.append(f"| {row['m']} | {row['mode']} | {res[anames[0]]['min_ms']:.2f} | " + " | ".join(cells) + " |")
    if overhead:
        lines += [
            "",
            f"Whole model, inference: {overhead['model']} with {overhead['method']} (kernel \"auto\"), batch "
            f"{overhead['batch']}, median of {overhead['repeats']} interleaved repeats: "
            f"base {overhead['base_ms']:.1f} ms, "
            f"injected {overhead['bapat_ms']:.1f} ms, **{overhead['ratio']:.3f}x** the base "
            f"(FLOPs {overhead['flop_ratio']:.3f}x).",
        ]
    if meta["device"] == "cpu":
        lines += ["", f"CPU: {meta['cpu_threads']} thread(s) on a small VM shared with other jobs; single cells "
                  "move by about +-5 % between runs (the two torch variants run the same forward ops)."]
    if meta["note"]:
        lines += ["", meta["note"] + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
