"""Training cost of PETL methods side by side with full fine-tuning and PEFT's LoRA.

For each method (full fine-tuning, linear probe, BitFit, PEFT LoRA-16 on the fused qkv,
vpetl LoRA-16 on Q,V, AdaptFormer-64, PATT-r and BAPAT-r for r = 32/64/128/256, and SSF,
FacT-TT-8, FacT-TK-32, Adapter+-8, Houlsby-8, Pfeiffer-8, RepAdapter-8, Convpass-8, DoRA-8)
and each model it measures, in one run:

* training step time (forward + cross-entropy + backward + AdamW step) relative to full
  fine-tuning: every repetition runs one step of every method in a rotating order, and the
  reported figure is the median over repetitions of (method time / full time in the same
  repetition), because on shared machines ratios hold and absolute times do not. On CPU
  the default is one torch thread timed by its CPU time (``time.thread_time``), which time
  slices taken by other processes do not inflate; on CUDA, synchronised wall-clock time;
* the FLOP-ideal of that ratio, counted with torch's FLOP counter on one training step
  (matmul/conv/attention FLOPs, forward + backward, batch 1 on CPU tensors);
* peak memory of a training step, measured in a fresh process per method (forked from a
  forkserver that has only imported the libraries) so methods do not pollute each other:
  on CUDA ``torch.cuda.max_memory_allocated`` (weights included), on CPU
  the peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after
  the model, optimizer and inputs are built) minus the resident size at that point, i.e. the
  memory the step adds: gradients, AdamW state, saved activations and temporaries;
* inference latency relative to the un-injected base model (eval, ``inference_mode``), and for
  the methods that merge exactly, again after ``vpetl.merge`` (which should cost the base's);
* trainable parameters, the size of the saved delta file against the full checkpoint, and
  the time of ``vpetl.inject`` / ``vpetl.load_delta`` (PEFT: ``get_peft_model`` /
  ``PeftModel.from_pretrained``; its delta is ``adapter_model.safetensors`` + config).

The README targets (``TARGETS``) are timed again at the end in a tight interleaving of only
the methods they name (``--target-repeats`` rounds) and reported pass/miss.

Usage:
    python benchmarks/train_step.py                                  # CPU set (~15-25 min on 2 shared cores)
    python benchmarks/train_step.py --big --device cuda --amp bf16   # GPU set: ViT-B/16 b64, Swin3D-B 8 frames
    python benchmarks/train_step.py --models vit_small_patch16_224 --repeats 3   # one model, quicker

Writes benchmarks/results/train_step_<device>.json, .md and .png (step time and peak memory
against trainable parameters).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty
from typing import Any, Callable


def _provenance():
    """benchmarks/provenance.py, loaded by path: the memory workers re-import this script in a
    fresh process whose sys.path no longer holds this folder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_vpetl_bench_provenance", Path(__file__).with_name("provenance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Python puts this script's folder first on sys.path; benchmarks/kernels.py would then shadow the
# Hugging Face `kernels` package that transformers (imported by peft) probes for. Nothing else here
# imports a sibling module, so the folder is dropped before any third-party import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import vpetl  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 10
WIDTHS = (32, 64, 128, 256)


# --------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class Method:
    """One row: a vpetl preset (``vpetl`` + ``d_bottle``) or PEFT's LoRA (``peft_rank``)."""

    label: str
    vpetl: str | None = None
    d_bottle: int | None = None
    peft_rank: int | None = None

    @property
    def has_branches(self) -> bool:
        """False when the forward graph is the base model's (full, linear, bitfit)."""
        return self.peft_rank is not None or (
            self.vpetl is not None and any(e.adds_branches for e in vpetl.presets.PRESETS[self.vpetl].entries))

    @property
    def merges(self) -> bool:
        """True when ``vpetl.merge`` folds every branch into the base weights (LoRA, SSF, FacT, ...)."""
        entries = vpetl.presets.PRESETS[self.vpetl].entries if self.vpetl is not None else ()
        return self.has_branches and self.peft_rank is None and all(e.mergeable for e in entries)


METHODS: tuple[Method, ...] = (
    Method("full", "full"),
    Method("linear", "linear"),
    Method("bitfit", "bitfit"),
    Method("peft-lora-16", peft_rank=16),
    Method("lora-16", "lora", 16),
    Method("adapter-64", "adapter", 64),
    *(Method(f"patt-{r}", "patt", r) for r in WIDTHS),
    *(Method(f"bapat-{r}", "bapat", r) for r in WIDTHS),
    # the methods the vision PETL benchmarks compare, at their papers' defaults
    Method("ssf", "ssf"),
    Method("fact_tt-8", "fact_tt", 8),
    Method("fact_tk-32", "fact_tk", 32),
    Method("adapter_plus-8", "adapter_plus", 8),
    Method("houlsby-8", "houlsby", 8),
    Method("pfeiffer-8", "pfeiffer", 8),
    Method("repadapter-8", "repadapter", 8),
    Method("convpass-8", "convpass", 8),
    Method("dora-8", "dora", 8),
)
METHOD_BY_LABEL = {m.label: m for m in METHODS}


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model and its input: images ``(B, 3, S, S)`` or clips ``(B, 3, T, S, S)``."""

    name: str
    batch: int
    frames: int = 0  # 0: an image model
    size: int = 224

    def build(self) -> nn.Module:
        """The base model with seeded random weights (no download), NUM_CLASSES outputs."""
        torch.manual_seed(0)
        if self.name.startswith("swin3d_"):
            import torchvision

            return getattr(torchvision.models.video, self.name)(num_classes=NUM_CLASSES)
        return timm.create_model(self.name, pretrained=False, num_classes=NUM_CLASSES)

    def inputs(self, device: str, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch if batch is None else batch
        gen = torch.Generator().manual_seed(1)
        shape = (b, 3, self.frames, self.size, self.size) if self.frames else (b, 3, self.size, self.size)
        x = torch.randn(shape, generator=gen).to(device)
        y = torch.randint(0, NUM_CLASSES, (b,), generator=gen).to(device)
        return x, y

    def describe(self) -> str:
        clip = f"{self.frames}x{self.size}x{self.size}" if self.frames else f"{self.size}x{self.size}"
        return f"{self.name}, batch {self.batch}, input {clip}"


# Defaults: CPU-sized models unless --big (the GPU set of the issue).
SMALL_MODELS = (ModelSpec("vit_small_patch16_224", batch=8), ModelSpec("swin3d_t", batch=1, frames=8, size=224))
BIG_MODELS = (ModelSpec("vit_base_patch16_224", batch=64), ModelSpec("swin3d_b", batch=8, frames=8, size=224))


@dataclass(frozen=True)
class Target:
    """A figure the README promises, with the run configuration it applies to."""

    device: str
    model: str
    batch: int
    amp: str
    metric: str  # "step", "memory", "infer", "step_vs_peft"
    method: str
    limit: float
    ideal: str

    def applies(self, device: str, spec: ModelSpec, amp: str) -> bool:
        return self.device == device and self.model == spec.name and self.batch == spec.batch and self.amp == amp

    def describe(self) -> str:
        what = {
            "step": f"{self.method} step <= {self.limit:.2f}x full fine-tuning",
            "memory": f"{self.method} peak memory <= {self.limit:.2f}x full fine-tuning",
            "infer": f"{self.method} inference <= {self.limit:.2f}x the base",
            "step_vs_peft": f"{self.method} step <= PEFT LoRA-16 step",
        }[self.metric]
        return f"{what} ({self.ideal})" if self.ideal else what


TARGETS = (
    Target("cpu", "vit_small_patch16_224", 8, "none", "step", "bapat-64", 0.80,
           "FLOP-ideal 0.71 for ViT-B in DESIGN.md §4; see the FLOPs column for this model"),
    Target("cpu", "vit_small_patch16_224", 8, "none", "infer", "bapat-64", 1.08, ""),
    Target("cpu", "vit_small_patch16_224", 8, "none", "step_vs_peft", "lora-16", 1.00, ""),
    Target("cuda", "vit_base_patch16_224", 64, "bf16", "step", "bapat-128", 0.78, "FLOP-ideal 0.73"),
    Target("cuda", "vit_base_patch16_224", 64, "bf16", "memory", "bapat-128", 0.70, ""),
)


# --------------------------------------------------------------------------- building and stepping


def build_method(base: nn.Module, method: Method) -> nn.Module:
    """A copy of ``base`` adapted by ``method`` (same base weights for every method)."""
    model = copy.deepcopy(base)
    if method.peft_rank is not None:
        return peft_lora(model, method.peft_rank)
    return vpetl.inject(model, method.vpetl, d_bottle=method.d_bottle)


def peft_lora(model: nn.Module, rank: int) -> nn.Module:
    """PEFT's LoRA as its users would set it up on a timm/torchvision model: rank ``rank``,
    alpha = rank (scale 1, as vpetl's LoRA) on the fused ``qkv`` Linear, head trained."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"], modules_to_save=["head"])
    return peft.get_peft_model(model, config)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with torch's defaults for the device (lr 1e-4): what a user gets."""
    return torch.optim.AdamW(trainable(model), lr=1e-4)


def autocast(device: str, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, device: str, amp: str) -> None:
    with autocast(device, amp):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def unreached_lora(model: nn.Module, x, y, device: str, amp: str) -> str | None:
    """For PEFT: why its LoRA trains nothing on this model, or None if every LoRA weight
    receives a gradient (torchvision's window attention reads ``qkv.weight`` itself)."""
    with autocast(device, amp):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    dead = [n for n, p in lora.items() if p.grad is None or not p.grad.any()]
    model.zero_grad(set_to_none=True)
    if lora and len(dead) == len(lora):
        owner = next(m for n, m in model.named_modules() if n and dead[0].startswith(n + ".") and n.endswith(".attn"))
        return (
            f"PEFT's LoRA on `qkv` receives no gradient ({len(dead)}/{len(lora)} LoRA tensors): "
            f"{type(owner).__module__}.{type(owner).__name__} passes `self.qkv.weight` to a functional attention "
            "instead of calling `self.qkv`, so PEFT's LoRA forward is never run"
        )
    return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- FLOPs


def _addmm_inplace_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def step_flops(base: nn.Module, method: Method | None, spec: ModelSpec, train: bool = True) -> int:
    """Matmul/conv/attention FLOPs of one training step (forward + backward) at batch 1, or
    with ``train=False`` of one eval forward (``method=None``: the un-injected base).

    Counted on CPU tensors for every method and device, so that every branch runs as plain
    torch ops the counter can see (a Triton kernel is opaque to it) and attention is counted
    the same way for all methods (CPU flash attention; its backward recomputes, as it runs).
    ``addmm_`` (vpetl adds branches in place) is not in torch's table, so it is added.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(base).cpu()
    model = build_method(model, method) if method is not None else model
    x, y = spec.inputs("cpu", batch=1)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flop})
    if train:
        with counter:
            F.cross_entropy(model.train()(x), y).backward()
    else:
        with counter, torch.no_grad():
            model.eval()(x)
    return counter.get_total_flops()


# --------------------------------------------------------------------------- memory (one process per method)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _release_free_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Build one model + method in this fresh process, run two training steps, report the peak."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    spec, method, device, amp = ModelSpec(**job["spec"]), METHOD_BY_LABEL[job["method"]], job["device"], job["amp"]
    base = spec.build().to(device)
    model = build_method(base, method).train()
    del base
    opt = make_optimizer(model)
    x, y = spec.inputs(device)
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            train_step(model, opt, x, y, device, amp)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"kind": "cuda max_memory_allocated", "peak_mb": peak / 2**20,
                "step_mb": (peak - before) / 2**20, "param_mb": param_mb}
    _release_free_heap()
    before = _rss_kib("VmRSS")
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        reset = False  # then VmHWM also covers building the model: an upper bound
    for _ in range(2):
        train_step(model, opt, x, y, device, amp)
    peak = _rss_kib("VmHWM")
    return {"kind": "cpu peak RSS (VmHWM) over RSS after build" + ("" if reset else ", peak not reset"),
            "peak_mb": peak / 1024, "step_mb": (peak - before) / 1024, "param_mb": param_mb}


_MEMORY_CONTEXT = None


def _memory_context():
    """A forkserver that imported torch, timm and vpetl but ran nothing: each worker forks from
    it in milliseconds instead of paying the imports, and starts with no tensors and no threads."""
    global _MEMORY_CONTEXT
    if _MEMORY_CONTEXT is None:
        import multiprocessing

        _MEMORY_CONTEXT = multiprocessing.get_context("forkserver")
        _MEMORY_CONTEXT.set_forkserver_preload(["torch", "timm", "torchvision", "vpetl", "peft"])
    return _MEMORY_CONTEXT


def _memory_entry(job: dict[str, Any], queue) -> None:
    try:
        queue.put(("ok", memory_worker(job)))
    except BaseException as error:  # report, do not hang the parent
        import traceback

        queue.put(("error", f"{error!r}\n{traceback.format_exc()}"))


def measure_memory(spec: ModelSpec, method: Method, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of a training step of ``method``, measured in a fresh process."""
    job = {"spec": asdict(spec), "method": method.label, "device": args.device, "amp": args.amp,
           "threads": args.threads}
    ctx = _memory_context()
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_entry, args=(job, queue))
    proc.start()
    while True:  # a worker that dies before reporting (import error, OOM kill) must not hang us
        try:
            status, payload = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"memory worker for {spec.name}/{method.label} exited with code {proc.exitcode} "
                    "without reporting (see its stderr above)."
                ) from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"memory worker for {spec.name}/{method.label} failed:\n{payload}")
    return payload


# --------------------------------------------------------------------------- contention


class CpuWatch:
    """CPU time other processes used while we measured: (system busy - ours) / wall, in cores."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover - the bench extra installs it
            psutil = None
        self.psutil = psutil
        self.load_start = os.getloadavg()
        self.t0 = time.monotonic()
        self.sys0 = self._system()
        self.own0 = self._own()

    def _system(self) -> tuple[float, float]:
        if self.psutil is None:
            return 0.0, 0.0
        t = self.psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)
        return busy, getattr(t, "steal", 0.0)

    def _own(self) -> float:
        if self.psutil is None:
            return 0.0
        t = self.psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def report(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        busy, steal = self._system()
        out: dict[str, Any] = {"wall_s": round(wall, 1), "loadavg_start": [round(v, 2) for v in self.load_start],
                               "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
        if self.psutil is not None:
            out["other_processes_cores"] = round(max(0.0, (busy - self.sys0[0]) - (self._own() - self.own0)) / wall, 2)
            out["steal_cores"] = round((steal - self.sys0[1]) / wall, 2)
        return out


# --------------------------------------------------------------------------- timing


Times = dict[str, dict[str, list[float]]]  # label -> {"wall": [...], "cpu": [...]} seconds


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """(wall-clock, this thread's CPU time) of ``fn()``, CUDA synchronised."""
    sync(device)
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.thread_time() - cpu


def _interleaved(labels: list[str], repeats: int, run: Callable[[str], None], device: str, bar) -> Times:
    """``repeats`` rounds of ``run(label)`` for every label, the order rotating each round."""
    times: Times = {label: {"wall": [], "cpu": []} for label in labels}
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            wall, cpu = _timed(lambda: run(label), device)
            times[label]["wall"].append(wall)
            times[label]["cpu"].append(cpu)
            bar.update()
    return times


def time_training(models, opts, spec, args, bar) -> Times:
    """Warm-up, then ``repeats`` rounds of one step per method in a rotating order."""
    x, y = spec.inputs(args.device)
    step = lambda label: train_step(models[label], opts[label], x, y, args.device, args.amp)  # noqa: E731
    for _ in range(args.warmup):
        for label in models:
            step(label)
            bar.update()
    return _interleaved(list(models), args.repeats, step, args.device, bar)


def time_inference(models, spec, args, bar, repeats: int | None = None) -> Times:
    """One warm-up forward each, then ``repeats`` (default ``--repeats``) interleaved rounds
    (eval, inference mode)."""
    x, _ = spec.inputs(args.device)
    for model in models.values():
        model.eval()
    with torch.inference_mode(), autocast(args.device, args.amp):
        for model in models.values():
            model(x)
            bar.update()
        rounds = args.repeats if repeats is None else repeats
        return _interleaved(list(models), rounds, lambda label: models[label](x), args.device, bar)


def clock(args: argparse.Namespace) -> str:
    """The timer whose ratios are reported: the thread's CPU time on CPU with one torch thread
    (every op and the backward run on the calling thread, and time slices taken by other
    processes do not count), wall-clock otherwise (CUDA: synchronised)."""
    return "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"


def median_ratio(samples: list[float], reference: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(samples, reference))


def _median_ms(fn: Callable[[], Any], setup: Callable[[], Any], reps: int) -> float:
    samples = []
    for _ in range(reps):
        arg = setup()
        start = time.perf_counter()
        fn(arg)
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def measure_io(base: nn.Module, model: nn.Module, method: Method, workdir: Path, reps: int = 3) -> dict[str, Any]:
    """Inject time, delta size on disk and load time, for ``model`` (already trained a bit)."""
    fresh = lambda: copy.deepcopy(base)  # noqa: E731 - built outside the timed region
    if method.peft_rank is not None:
        import peft

        target = workdir / method.label
        model.save_pretrained(target)
        files = [target / "adapter_model.safetensors", target / "adapter_config.json"]
        return {
            "inject_ms": _median_ms(lambda m: peft_lora(m, method.peft_rank), fresh, reps),
            "delta_bytes": sum(f.stat().st_size for f in files),
            "load_ms": _median_ms(lambda m: peft.PeftModel.from_pretrained(m, target), fresh, reps),
        }
    target = workdir / f"{method.label}.safetensors"
    vpetl.save_delta(model, target)
    return {
        "inject_ms": _median_ms(lambda m: vpetl.inject(m, method.vpetl, d_bottle=method.d_bottle), fresh, reps),
        "delta_bytes": target.stat().st_size,
        "load_ms": _median_ms(lambda m: vpetl.load_delta(m, target), fresh, reps),
    }


def full_checkpoint(base: nn.Module, workdir: Path, reps: int = 3) -> dict[str, Any]:
    """Size of the base model's full safetensors checkpoint and the time to load it."""
    import safetensors.torch

    path = workdir / "full_checkpoint.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in base.state_dict().items()}, path)
    load = lambda m: m.load_state_dict(safetensors.torch.load_file(path, device=str(next(m.parameters()).device)))  # noqa: E731
    return {"bytes": path.stat().st_size, "load_ms": _median_ms(load, lambda: copy.deepcopy(base), reps)}


# --------------------------------------------------------------------------- one model


def run_model(spec: ModelSpec, methods: list[Method], args: argparse.Namespace, bar) -> dict[str, Any]:
    """Every measurement of every method on one model."""
    result: dict[str, Any] = {"settings": {**asdict(spec), "describe": spec.describe()}, "rows": [], "skipped": []}
    base = spec.build().to(args.device).train()
    x, y = spec.inputs(args.device)

    # 1. which methods can run at all (PEFT cannot reach torchvision's window attention; Convpass and
    #    FacT need a plain ViT)
    models: dict[str, nn.Module] = {}
    for method in methods:
        try:
            model = build_method(base, method).train()
        except vpetl.InjectionError as error:
            result["skipped"].append({"method": method.label, "reason": str(error).split(". ")[0]})
            bar.total -= _units(method, args)
            continue
        if method.peft_rank is not None:
            reason = unreached_lora(model, x, y, args.device, args.amp)
            if reason:
                result["skipped"].append({"method": method.label, "reason": reason})
                bar.total -= _units(method, args)
                continue
        models[method.label] = model
    active = [m for m in methods if m.label in models]
    if "full" not in models:
        raise SystemExit("the 'full' method is the reference of every ratio; keep it in --methods")

    # 2. peak memory, each method in its own process (before this process holds many models' state)
    bar.set_description(f"{spec.name}: memory")
    memory = {}
    for method in active:
        memory[method.label] = measure_memory(spec, method, args)
        bar.update()

    # 3. FLOP-ideal ratios (meta device, instant)
    flops = {m.label: step_flops(base, m, spec) for m in active}
    base_forward_flops = step_flops(base, None, spec, train=False)
    infer_flops = {m.label: step_flops(base, m, spec, train=False) / base_forward_flops
                   for m in active if m.has_branches}

    # 4. interleaved training steps
    bar.set_description(f"{spec.name}: train steps")
    opts = {label: make_optimizer(model) for label, model in models.items()}
    watch = CpuWatch()
    step_times = time_training(models, opts, spec, args, bar)
    result["contention_train"] = watch.report()
    del opts
    gc.collect()

    # 5. interleaved inference (the base, then every method whose forward differs from it)
    bar.set_description(f"{spec.name}: inference")
    infer_models = {"base": base, **{m.label: models[m.label] for m in active if m.has_branches}}
    for m in active:  # the same model after vpetl.merge: its inference should cost the base's
        if m.merges:
            infer_models[m.label + " merged"] = vpetl.merge(copy.deepcopy(models[m.label])).eval()
    watch = CpuWatch()
    infer_times = time_inference(infer_models, spec, args, bar)
    result["contention_inference"] = watch.report()

    # 6. the README targets again, in a tight interleaving of only the methods they name
    focus = focused_targets(spec, args, base, models, bar)
    if focus:
        result["focused"] = focus

    # 7. delta files, inject and load times
    bar.set_description(f"{spec.name}: delta I/O")
    workdir = Path(tempfile.mkdtemp(prefix="vpetl-bench-"))
    try:
        result["full_checkpoint"] = full_checkpoint(base, workdir)
        io = {}
        for method in active:
            io[method.label] = measure_io(base, models[method.label], method, workdir)
            bar.update()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    timer = clock(args)
    steps = {label: t[timer] for label, t in step_times.items()}
    walls = {label: t["wall"] for label, t in step_times.items()}
    infers = {label: t[timer] for label, t in infer_times.items()}
    full_flops, full_mem = flops["full"], memory["full"]
    mem_key = "peak_mb" if args.device.startswith("cuda") else "step_mb"
    total = sum(p.numel() for p in base.parameters())
    for method in active:
        label, model = method.label, models[method.label]
        n_train = sum(p.numel() for p in trainable(model))
        infer = label in infers
        row = {
            "method": label,
            "trainable": n_train,
            "trainable_pct": 100 * n_train / total,
            "step_ms": 1e3 * statistics.median(steps[label]),
            "step_ratio": median_ratio(steps[label], steps["full"]),
            "step_ratio_spread": _spread(steps[label], steps["full"]),
            "step_ratio_of_minima": min(steps[label]) / min(steps["full"]),
            "step_wall_ms": 1e3 * statistics.median(walls[label]),
            "step_ratio_wall": median_ratio(walls[label], walls["full"]),
            "flop_ratio": flops[label] / full_flops,
            "mem_peak_mb": memory[label]["peak_mb"],
            "mem_step_mb": memory[label]["step_mb"],
            "mem_ratio": memory[label][mem_key] / full_mem[mem_key],
            "infer_ratio": median_ratio(infers[label], infers["base"]) if infer else None,
            "infer_ratio_spread": _spread(infers[label], infers["base"]) if infer else None,
            "infer_flop_ratio": infer_flops.get(label),
            "infer_ratio_wall": median_ratio(infer_times[label]["wall"], infer_times["base"]["wall"]) if infer else None,
            "infer_merged_ratio": (median_ratio(infers[label + " merged"], infers["base"])
                                   if label + " merged" in infers else None),
            "delta_bytes": io[label]["delta_bytes"],
            "delta_ratio": io[label]["delta_bytes"] / result["full_checkpoint"]["bytes"],
            "inject_ms": io[label]["inject_ms"],
            "load_ms": io[label]["load_ms"],
        }
        result["rows"].append(row)
    result["clock"] = timer
    result["raw_times_s"] = {"train": step_times, "inference": infer_times}
    if "peft-lora-16" in steps and "lora-16" in steps:
        result["lora_vs_peft_step"] = median_ratio(steps["lora-16"], steps["peft-lora-16"])
        result["lora_vs_peft_step_spread"] = _spread(steps["lora-16"], steps["peft-lora-16"])
    result["base_infer_ms"] = 1e3 * statistics.median(infers["base"])
    result["memory_kind"] = full_mem["kind"]
    result["base_params"] = total
    result["targets"] = check_targets(spec, args, result)
    del models, infer_models
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def _spread(samples: list[float], reference: list[float]) -> list[float]:
    ratios = sorted(t / b for t, b in zip(samples, reference))
    return [ratios[0], ratios[-1]]


def applicable_targets(spec: ModelSpec, args: argparse.Namespace) -> list[Target]:
    return [t for t in TARGETS if t.applies(args.device.split(":")[0], spec, args.amp)]


def focused_targets(spec, args, base, models, bar) -> dict[str, Any] | None:
    """Time the methods a target names (with full fine-tuning / the base as reference) again,
    ``--target-repeats`` rounds of only these, so each ratio's two sides run seconds apart."""
    targets = [t for t in applicable_targets(spec, args) if t.metric != "memory" and t.method in models]
    if not targets or args.target_repeats <= 0:
        return None
    train = ["full"] + sorted({t.method for t in targets if t.metric in ("step", "step_vs_peft")})
    if any(t.metric == "step_vs_peft" for t in targets) and "peft-lora-16" in models:
        train.append("peft-lora-16")
    infer = ["base"] + sorted({t.method for t in targets if t.metric == "infer"})
    n = args.target_repeats
    bar.total += (len(train) * (1 + n) + (len(infer) * (1 + n) if len(infer) > 1 else 0))
    bar.set_description(f"{spec.name}: targets")
    timer = clock(args)
    sub = {label: models[label].train() for label in train}
    opts = {label: make_optimizer(model) for label, model in sub.items()}
    x, y = spec.inputs(args.device)
    step = lambda label: train_step(sub[label], opts[label], x, y, args.device, args.amp)  # noqa: E731
    for label in train:
        step(label)
        bar.update()
    times = _interleaved(train, n, step, args.device, bar)
    steps = {label: t[timer] for label, t in times.items()}
    out: dict[str, Any] = {"repeats": n, "train_methods": train, "step_ratio": {}, "step_ratio_spread": {}}
    for label in train[1:]:
        out["step_ratio"][label] = median_ratio(steps[label], steps["full"])
        out["step_ratio_spread"][label] = _spread(steps[label], steps["full"])
    if "lora-16" in steps and "peft-lora-16" in steps:
        out["lora_vs_peft_step"] = median_ratio(steps["lora-16"], steps["peft-lora-16"])
        out["lora_vs_peft_step_spread"] = _spread(steps["lora-16"], steps["peft-lora-16"])
    if len(infer) > 1:
        infer_times = time_inference({"base": base, **{m: models[m] for m in infer[1:]}}, spec, args, bar, repeats=n)
        out["infer_ratio"] = {m: median_ratio(infer_times[m][timer], infer_times["base"][timer]) for m in infer[1:]}
        out["infer_ratio_spread"] = {m: _spread(infer_times[m][timer], infer_times["base"][timer]) for m in infer[1:]}
    out["raw_times_s"] = {"train": times, **({"inference": infer_times} if len(infer) > 1 else {})}
    return out


def check_targets(spec: ModelSpec, args: argparse.Namespace, result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each applicable target with its measured value: from the focused timing where there is
    one, else from the sweep (memory always from the per-process measurement)."""
    rows = {r["method"]: r for r in result["rows"]}
    focus = result.get("focused") or {}
    out = []
    for target in applicable_targets(spec, args):
        if target.method not in rows:
            continue
        row = rows[target.method]
        sweep = {
            "step": (row["step_ratio"], row["step_ratio_spread"]),
            "memory": (row["mem_ratio"], None),
            "infer": (row["infer_ratio"], row["infer_ratio_spread"]),
            "step_vs_peft": (result.get("lora_vs_peft_step"), result.get("lora_vs_peft_step_spread")),
        }[target.metric]
        focused = {
            "step": (focus.get("step_ratio", {}).get(target.method), focus.get("step_ratio_spread", {}).get(target.method)),
            "memory": (None, None),
            "infer": (focus.get("infer_ratio", {}).get(target.method), focus.get("infer_ratio_spread", {}).get(target.method)),
            "step_vs_peft": (focus.get("lora_vs_peft_step"), focus.get("lora_vs_peft_step_spread")),
        }[target.metric]
        (value, spread), source = (focused, f"focused, {focus.get('repeats')} rounds") if focused[0] is not None else (sweep, "sweep")
        if value is None:
            continue
        out.append({"target": target.describe(), "limit": target.limit, "measured": value, "spread": spread,
                    "sweep": sweep[0], "source": source,
                    "flop_ideal": {"step": row["flop_ratio"], "infer": row.get("infer_flop_ratio")}.get(target.metric),
                    "pass": value <= target.limit})
    return out


def _units(method: Method, args: argparse.Namespace) -> int:
    """Progress units of one method: memory + warm-up/timed steps + inference + I/O."""
    inference = (1 + args.repeats) * (int(method.has_branches) + int(method.merges))
    return 1 + args.warmup + args.repeats + inference + 1


# --------------------------------------------------------------------------- output


def metadata(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import torchvision

    provenance = _provenance()
    return {
        **provenance.machine_state(args.device),
        "amp": args.amp, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "peft": peft.__version__, "vpetl": vpetl.__version__,
        "repeats": args.repeats, "warmup": args.warmup,
        "vpetl_kernel_env": os.environ.get("VPETL_KERNEL"),
        "optimizer": "torch.optim.AdamW(lr=1e-4), torch defaults for the device",
        "loss": "cross_entropy over random labels, num_classes=10",
        "command": " ".join(["python benchmarks/train_step.py", *sys.argv[1:]]),
        **provenance.git_state(),
    }



def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.2f}" if n_bytes < 10 * 2**20 else f"{n_bytes / 2**20:.0f}"


def markdown(meta: dict[str, Any], results: dict[str, Any]) -> str:
    cuda = meta["device"].startswith("cuda")
    lines = [
        f"# Training cost side by side ({meta['device_name']}{', ' + meta['amp'] + ' autocast' if meta['amp'] != 'none' else ''})",
        "",
        f"{meta['date']}, torch {meta['torch']}, torchvision {meta['torchvision']}, timm {meta['timm']}, "
        f"peft {meta['peft']}, vpetl {meta['vpetl']} at {meta['git_commit']}"
        f"{' + uncommitted ' + ', '.join(meta['src_uncommitted']) if meta['src_uncommitted'] else ''}, Python {meta['python']}, {meta['cpu_threads']} torch CPU thread(s) "
        f"({meta['cpu_count']} cores). `{meta['command']}`",
        "",
        f"Step = forward + cross-entropy + backward + AdamW step. Ratios are medians over {meta['repeats']} "
        f"interleaved repetitions (after {meta['warmup']} warm-up) of per-repetition ratios; `[min-max]` is their "
        "range. "
        + ("Times are the main thread's CPU time (`time.thread_time`): with one torch thread every op and the "
           "backward run on it, and time slices taken by other processes on this shared machine do not count; "
           "wall-clock times and ratios are in the JSON. "
           if meta.get("clock") == "cpu" else "Times are wall-clock" + (", CUDA-synchronised. " if cuda else ". "))
        + "FLOPs / full: matmul, conv and attention FLOPs of one step from torch's FLOP counter (the ideal "
        "the step ratio would reach if time followed FLOPs); infer FLOPs / base: the same for one eval forward. Memory: "
        + ("`torch.cuda.max_memory_allocated` of two training steps, weights included, one process per method."
           if cuda else
           "peak RSS increase during two training steps over the RSS after building model, optimizer and inputs "
           "(Linux VmHWM reset through /proc/self/clear_refs; gradients, AdamW state, saved activations, "
           "temporaries; the frozen weights, identical for every method, are excluded), one process per method.")
        + " Inference: eval forward vs the un-injected base; `= base` where the forward graph is the base's; "
        "after merge: the same model after `vpetl.merge` (methods that merge exactly), which should cost the base's. "
        "Delta: the saved file (vpetl `save_delta`; PEFT `adapter_model.safetensors` + `adapter_config.json`) "
        "vs the full safetensors checkpoint.",
    ]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}."]
    for name, res in results.items():
        s = res["settings"]
        ct, ci = res["contention_train"], res["contention_inference"]
        lines += [
            "",
            f"## {s['describe']}",
            "",
            f"Base: {res['base_params']:,} parameters, inference {res['base_infer_ms']:.1f} ms/batch; full "
            f"checkpoint {_mb(res['full_checkpoint']['bytes'])} MB, loads in {res['full_checkpoint']['load_ms']:.0f} ms. "
            f"Other processes used {ct.get('other_processes_cores', '?')} cores on average during the training "
            f"steps and {ci.get('other_processes_cores', '?')} during inference (load average "
            f"{ct['loadavg_start'][0]} → {ci['loadavg_end'][0]}).",
            "",
            f"| method | trainable | % | step ms{' (CPU)' if res.get('clock') == 'cpu' else ''} | step / full [min-max] | FLOPs / full | "
            + ("peak MB | mem / full" if cuda else "step mem MB | mem / full")
            + " | infer / base [min-max] | after merge / base | infer FLOPs / base | delta MB | delta / ckpt | inject ms "
            "| load ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["rows"]:
            infer = "= base" if r["infer_ratio"] is None else f"{r['infer_ratio']:.3f}"
            if r.get("infer_ratio_spread"):
                infer += " [{:.2f}-{:.2f}]".format(*r["infer_ratio_spread"])
            mem = r["mem_peak_mb"] if cuda else r["mem_step_mb"]
            lo, hi = r["step_ratio_spread"]
            lines.append(
                f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {r['step_ms']:.0f} | "
                f"{r['step_ratio']:.3f} [{lo:.2f}-{hi:.2f}] | {r['flop_ratio']:.3f} | {mem:.0f} | {r['mem_ratio']:.3f} | "
                f"{infer} | {'-' if r.get('infer_merged_ratio') is None else format(r['infer_merged_ratio'], '.3f')} | "
                f"{'-' if r.get('infer_flop_ratio') is None else format(r['infer_flop_ratio'], '.3f')} | {_mb(r['delta_bytes'])} | {r['delta_ratio']:.4f} | {r['inject_ms']:.1f} | {r['load_ms']:.1f} |"
            )
        for skip in res["skipped"]:
            lines += ["", f"Skipped **{skip['method']}**: {skip['reason']}."]
        if "lora_vs_peft_step" in res:
            lo, hi = res["lora_vs_peft_step_spread"]
            lines += ["", f"vpetl LoRA-16 step / PEFT LoRA-16 step: {res['lora_vs_peft_step']:.3f} [{lo:.2f}-{hi:.2f}] "
                      "(median of per-repetition ratios)."]
        if res["targets"]:
            lines += ["", "| target | measured [min-max] | in the sweep | FLOP-ideal | measured by | |",
                      "|---|---:|---:|---:|---|---|"]
            for t in res["targets"]:
                ideal = f"{t['flop_ideal']:.3f}" if t["flop_ideal"] is not None else "-"
                spread = " [{:.2f}-{:.2f}]".format(*t["spread"]) if t.get("spread") else ""
                lines.append(f"| {t['target']} | {t['measured']:.3f}{spread} | {t['sweep']:.3f} | {ideal} | "
                             f"{t['source']} | {'pass' if t['pass'] else '**miss**'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    """Step time and memory (ratios to full fine-tuning) against trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = list(results)
    mem_title = "peak memory / full" if meta["device"].startswith("cuda") else "step memory (RSS increase) / full"
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 8), squeeze=False)
    colours = {"full": "black", "linear": "grey", "bitfit": "tab:brown", "peft-lora-16": "tab:red",
               "lora-16": "tab:orange", "adapter-64": "tab:green", "patt": "tab:blue", "bapat": "tab:purple"}
    for col, name in enumerate(names):
        rows = results[name]["rows"]
        for row_i, (key, title) in enumerate((("step_ratio", "training step / full"), ("mem_ratio", mem_title))):
            ax = axes[row_i][col]
            seen: set[str] = set()
            for r in rows:
                family, _, width = r["method"].partition("-")
                group = family if family in ("patt", "bapat") else r["method"]
                colour = colours.get(group, "tab:cyan")
                ax.scatter(r["trainable"], r[key], color=colour, zorder=3,
                           label=(group + ("-r" if group in ("patt", "bapat") else "")) if group not in seen else None)
                seen.add(group)
                if group in ("patt", "bapat"):  # the width only, patt above and bapat below the point
                    ax.annotate(width, (r["trainable"], r[key]), fontsize=7, color=colour, ha="center",
                                xytext=(0, 6 if group == "patt" else -11), textcoords="offset points")
                if key == "step_ratio":
                    ax.scatter(r["trainable"], r["flop_ratio"], facecolors="none", edgecolors=colour, zorder=2)
            ax.legend(fontsize=7, loc="lower right", ncol=2)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(0, 1.1)
            ax.axhline(1.0, color="black", lw=0.6, ls=":")
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel(title + (" (hollow: FLOP-ideal)" if key == "step_ratio" else ""))
            ax.set_title(f"{results[name]['settings']['describe']}", fontsize=9)
            ax.grid(alpha=0.3)
    fig.suptitle(f"vpetl training cost, {meta['device_name']}, {meta['date'][:10]}, torch {meta['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("Usage:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n] (default cpu)")
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype (GPU set: bf16)")
    parser.add_argument("--big", action="store_true",
                        help="the GPU set: vit_base_patch16_224 (batch 64) and swin3d_b (batch 8, 8x224x224)")
    parser.add_argument("--models", help="comma-separated subset of the set's models (or other timm names)")
    parser.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHOD_BY_LABEL)} (full is required)")
    parser.add_argument("--batch", type=int, help="batch size for every model (default: per model)")
    parser.add_argument("--frames", type=int, help="video frames for swin3d models (default 8)")
    parser.add_argument("--size", type=int, help="input resolution for swin3d models (default 224)")
    parser.add_argument("--repeats", type=int, default=7, help="timed interleaved repetitions (default 7)")
    parser.add_argument("--target-repeats", type=int, default=15,
                        help="rounds of the focused timing of the methods a README target names (default 15; 0: off)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per method first (default 2)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: 1 on CPU, see benchmarks/README.md: with 2 threads on a shared machine "
        "OpenMP barriers stall whenever another process holds a core; 0: torch's default)",
    )
    parser.add_argument("--out", help="output stem under benchmarks/results/ (default train_step_<device>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the .md and .png next to an existing results JSON")
    return parser.parse_args(argv)


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    known = {s.name: s for s in (BIG_MODELS if args.big else SMALL_MODELS)}
    names = args.models.split(",") if args.models else list(known)
    specs = []
    for name in names:
        spec = known.get(name) or next((s for s in SMALL_MODELS + BIG_MODELS if s.name == name), None)
        if spec is None:
            spec = ModelSpec(name, batch=8, frames=8 if name.startswith("swin3d_") else 0)
        spec = ModelSpec(
            spec.name,
            batch=args.batch or spec.batch,
            frames=(args.frames or spec.frames) if spec.frames else 0,
            size=(args.size or spec.size) if spec.frames else spec.size,
        )
        specs.append(spec)
    return specs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        stem = Path(args.render).with_suffix("")
        stem.with_suffix(".md").write_text(markdown(data["meta"], data["models"]))
        plot(data["models"], data["meta"], stem.with_suffix(".png"))
        print(f"wrote {stem}.md, .png")
        return
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [METHOD_BY_LABEL[m] for m in args.methods.split(",")] if args.methods else list(METHODS)
    specs = model_specs(args)
    from tqdm.auto import tqdm

    meta = metadata(args)
    watch = CpuWatch()
    results: dict[str, Any] = {}
    per_model = sum(_units(m, args) for m in methods) + 1 + args.repeats  # + the base's inference
    with tqdm(total=per_model * len(specs), disable=args.no_progress, unit="step", dynamic_ncols=True) as bar:
        for spec in specs:
            results[spec.name] = run_model(spec, methods, args, bar)
    meta["contention_whole_run"] = watch.report()
    meta["clock"] = clock(args)

    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / (args.out or f"train_step_{args.device.split(':')[0]}")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": results}, indent=2) + "\n")
    text = markdown(meta, results)
    stem.with_suffix(".md").write_text(text)
    plot(results, meta, stem.with_suffix(".png"))
    print(text)
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
