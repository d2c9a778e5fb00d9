"""Many tasks on one frozen backbone: a mixed batch routed per sample (``vpetl.route``) against
the ways of serving the same batch without it, and against PEFT's mixed-adapter batch.

Model: timm ``vit_small_patch16_224`` (seeded random weights, 10 classes), eval, inference
mode, batch 32 at 224 px; sample ``i`` belongs to task ``i % T`` (T = 8). Every task is a delta
file written by ``vpetl.save_delta`` (PEFT: ``save_pretrained``) after its trainable tensors were
perturbed with a seeded generator, so every branch and head changes the output.

Times, all variants side by side in one run (``--repeats`` rounds after one warm-up round, the
order rotating each round; every ratio is the median over rounds of the per-round ratio, with the
[min-max] range of those ratios):

* (a) ``bapat_mixed``: one model holding the T BAPAT-64 tasks (``load_delta(..., task=)``),
  ``with vpetl.route(model, routes): model(x)`` on the whole batch;
* (a') ``bapat_mixed_sorted``: the same model, the batch reordered so each task's samples are
  consecutive (every task's rows are then one slice: no gathers), the outputs put back in batch
  order, both reorderings timed; (a'') ``bapat_mixed_triton``, CUDA only: (a) with
  ``kernel="triton"``, the grouped PATT kernel (:mod:`vpetl.kernels.grouped_triton`);
* (b) ``bapat_single``: one model with one BAPAT-64 injected (``vpetl.inject``), ``model(x)``;
* (c) ``bapat_swap_load``: one injected BAPAT model; per task ``vpetl.load_delta`` of its file
  (read from disk, fingerprint checked), then its sub-batch ``x[t::T]``; ``bapat_swap_copy``: the
  same with the task's tensors (held in memory on the device) ``copy_``-ed into the parameters;
* (d) ``bapat_separate``: T full copies of the model, each with its own delta, each runs its
  sub-batch; (c) and (d) write their outputs into one ``(B, classes)`` tensor in batch order;
* (e) ``base``: the plain model, for reference, and ``base_split``: the plain model run on the T
  sub-batches one after the other, which isolates what smaller batches alone change;
* LoRA-16: ``lora_mixed`` (T vpetl tasks, routed) and ``lora_single`` against PEFT's
  ``peft_mixed`` (T adapters loaded with ``load_adapter``, ``model(x, adapter_names=[...])``;
  ``PeftModel.forward`` turns ``adapter_names`` into forward pre-hooks on its LoRA layers, so
  the timm model's own forward needs no extra keyword) and ``peft_single`` (one adapter).
  vpetl's LoRA puts rank-16 pairs on the q and v slots of the fused qkv; PEFT's on the whole qkv
  Linear (``target_modules=["qkv"]``): the same parameter count and FLOPs, different placement.
  Both train the head (PEFT: ``modules_to_save=["head"]``).

On CPU the clock is the calling thread's CPU time (``time.thread_time``) with one torch thread,
so time slices taken by other processes on a shared machine are not counted (wall times are in
the JSON too); on CUDA, synchronised wall-clock time. Before timing, every mixed-batch output is
checked against the same samples run through a single-task model (max abs difference recorded).

Memory: bytes of ``model.state_dict()`` with tensors counted once per ``data_ptr`` (duplicates
reported), against the base's bytes plus T times the delta file's tensor bytes (the target:
at most 10 % above that sum) and against T separate models; and, unless ``--no-rss``, each
model built in a fresh process (forked from a forkserver that only imported the libraries):
the resident-set increase of building it, and the peak increase during one forward of the
batch (Linux VmRSS / VmHWM, reset through /proc/self/clear_refs; CUDA: memory_allocated).

Usage:
    python benchmarks/multitask.py                      # CPU, ViT-S/16 b32, 8 tasks, 7 rounds (~4 min on 2 cores)
    python benchmarks/multitask.py --device cuda        # the same on a GPU (wall clock, synchronised)
    python benchmarks/multitask.py --quick              # tiny shapes in seconds (smoke test)

Targets, Markdown and plot: ``benchmarks/multitask_report.py``. Writes
benchmarks/results/multitask_<device>.json, .md and .png (``--quick``: under the system
temp folder unless ``--out`` is given, so a smoke test never overwrites measured results).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

# benchmarks/kernels.py would shadow the Hugging Face `kernels` package that transformers (imported
# by peft) probes for: drop this folder from sys.path before any third-party import (train_step.py).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import safetensors.torch
import timm
import torch

import vpetl


def _sibling(name: str):
    """``benchmarks/<name>.py`` loaded by path (this folder is off sys.path, see above)."""
    spec = importlib.util.spec_from_file_location(f"_vpetl_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _sibling("multitask_report")
NUM_CLASSES, BAPAT_LABELS, LORA_LABELS, RSS_LABELS = (report.NUM_CLASSES, report.BAPAT_LABELS, report.LORA_LABELS,
                                                      report.RSS_LABELS)

RESULTS = Path(__file__).resolve().parent / "results"
BAPAT_WIDTH, LORA_RANK, PERTURB = 64, 16, 0.02


# --------------------------------------------------------------------------- models and deltas


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    """The seeded base (no download); ``--quick``: 2 blocks at 32 px (ViT-S width)."""
    torch.manual_seed(0)
    extra = {"img_size": 32, "depth": 2} if args.quick else {}
    return timm.create_model(args.model, pretrained=False, num_classes=NUM_CLASSES, **extra).eval().to(args.device)


def _perturb(named, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in named:
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=gen) * PERTURB).to(p.device, p.dtype))


def peft_config():
    import peft

    return peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=["qkv"], modules_to_save=["head"])


def write_deltas(base: torch.nn.Module, args: argparse.Namespace, workdir: Path) -> dict[str, list[Path]]:
    """T delta files per family: vpetl BAPAT-64 and LoRA-16 (``save_delta``), PEFT LoRA-16 dirs."""
    import peft

    files: dict[str, list[Path]] = {"bapat": [], "lora": [], "peft": []}
    for t in range(args.tasks):
        for family, method, width in (("bapat", "bapat", BAPAT_WIDTH), ("lora", "lora", LORA_RANK)):
            model = vpetl.inject(copy.deepcopy(base), method, d_bottle=width)
            _perturb(model.named_parameters(), 1000 * t + width)
            files[family].append(vpetl.save_delta(model, workdir / f"{family}_{t}.safetensors"))
        model = peft.get_peft_model(copy.deepcopy(base), peft_config())
        _perturb(model.named_parameters(), 1000 * t + 1)
        model.save_pretrained(workdir / f"peft_{t}")
        files["peft"].append(workdir / f"peft_{t}")
    return files


def build(label: str, base: torch.nn.Module, files: dict[str, list[Path]]) -> Any:
    """The model (a list for ``bapat_separate``) a variant runs; ``base`` is left unchanged."""
    import peft

    def multi(family: str) -> torch.nn.Module:
        model = copy.deepcopy(base)
        for t, path in enumerate(files[family]):
            vpetl.load_delta(model, path, task=f"t{t}")
        return model

    if label in ("base", "base_split"):
        return copy.deepcopy(base)
    if label in ("bapat_single", "bapat_swap_load", "bapat_swap_copy", "lora_single"):
        family = label.split("_")[0]
        return vpetl.load_delta(copy.deepcopy(base), files[family][0]).eval()  # injects the stored config
    if label in ("bapat_mixed", "bapat_mixed_sorted", "bapat_mixed_triton", "lora_mixed"):
        return multi(label.split("_")[0]).eval()
    if label == "bapat_separate":
        return [vpetl.load_delta(copy.deepcopy(base), path).eval() for path in files["bapat"]]
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), files["peft"][0], adapter_name="t0")
    if label == "peft_mixed":
        for t, path in enumerate(files["peft"][1:], start=1):
            model.load_adapter(path, adapter_name=f"t{t}")
    return model.eval()


def forward(label: str, model: Any, x: torch.Tensor, files: dict[str, list[Path]], tasks: int) -> Callable[[], Any]:
    """The timed call of a variant: one batch ``x`` through ``model`` (sample i -> task i % T)."""
    routes = [f"t{i % tasks}" for i in range(x.shape[0])]
    if label in ("bapat_mixed", "lora_mixed"):
        def run():
            with vpetl.route(model, routes):
                return model(x)
        return run
    if label == "bapat_mixed_sorted":  # what a server can do: sort by task, run, put the outputs back
        order = torch.tensor(sorted(range(x.shape[0]), key=lambda i: i % tasks), device=x.device)
        ordered = [routes[i] for i in order.tolist()]

        def run():
            with vpetl.route(model, ordered):
                y = model(x.index_select(0, order))
            return y.new_empty(y.shape).index_copy_(0, order, y)
        return run
    if label == "bapat_mixed_triton":  # the variable is read per call: set it for this variant's calls only
        def run():
            os.environ[vpetl.kernels.ENV_VAR] = "triton"
            try:
                with vpetl.route(model, routes):
                    return model(x)
            finally:
                del os.environ[vpetl.kernels.ENV_VAR]
        return run
    if label == "peft_mixed":
        return lambda: model(x, adapter_names=routes)
    if label in ("base_split", "bapat_swap_load", "bapat_swap_copy", "bapat_separate"):
        params = dict(model.named_parameters()) if label == "bapat_swap_copy" else {}
        stored = [{name: tensor.to(x.device) for name, tensor in safetensors.torch.load_file(path).items()}
                  for path in files["bapat"]] if params else []

        def run():
            out = None
            for t in range(tasks):
                if label == "bapat_swap_load":
                    vpetl.load_delta(model, files["bapat"][t])
                elif params:
                    for name, tensor in stored[t].items():
                        params[name].copy_(tensor)
                y = (model[t] if label == "bapat_separate" else model)(x[t::tasks])
                out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
                out[t::tasks] = y
            return out
        return run
    return lambda: model(x)


# --------------------------------------------------------------------------- memory


def state_bytes(models: Any) -> dict[str, Any]:
    """Bytes of the state dicts of ``models`` (one or a list), each storage counted once."""
    seen: dict[int, int] = {}
    naive = entries = 0
    for model in models if isinstance(models, list) else [models]:
        for tensor in model.state_dict().values():
            size = tensor.numel() * tensor.element_size()
            naive, entries = naive + size, entries + 1
            seen[tensor.data_ptr()] = max(seen.get(tensor.data_ptr(), 0), size)
    return {"bytes": sum(seen.values()), "naive_bytes": naive, "tensors": entries, "shared": entries - len(seen)}


def file_tensor_bytes(path: Path) -> int:
    target = path / "adapter_model.safetensors" if path.is_dir() else path
    return sum(t.numel() * t.element_size() for t in safetensors.torch.load_file(target).values())


def _resident() -> tuple[int, int]:
    """(VmRSS, RssFile) in bytes: the file-backed part is memory-mapped files (e.g. safetensors)."""
    return _status_kib("VmRSS") * 1024, _status_kib("RssFile") * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_worker(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: build one variant, report what building it and one forward add."""
    args = argparse.Namespace(**job["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    files = {k: [Path(p) for p in v] for k, v in job["files"].items()}
    cuda = args.device.startswith("cuda")
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(args.device)
    _trim()
    before, file_before = (torch.cuda.memory_allocated(), 0) if cuda else _resident()
    base = build_base(args)
    model = build(job["label"], base, files)
    del base
    run = forward(job["label"], model, x, files, args.tasks)
    _trim()
    built, file_built = (torch.cuda.memory_allocated(), 0) if cuda else _resident()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    with torch.inference_mode():
        run()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {"built_bytes": built - before, "built_file_backed_bytes": file_built - file_before,
            "forward_peak_bytes": peak - built,
            "kind": "cuda memory_allocated" if cuda else "RSS (VmRSS, VmHWM)"}


def _rss_entry(job: dict[str, Any], queue) -> None:
    try:
        queue.put(("ok", rss_worker(job)))
    except BaseException as error:  # noqa: BLE001 (report, do not hang the parent)
        import traceback

        queue.put(("error", f"{error!r}\n{traceback.format_exc()}"))


def measure_rss(args: argparse.Namespace, files: dict[str, list[Path]]) -> dict[str, Any]:
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "vpetl", "peft"])
    out = {}
    for label in RSS_LABELS:
        job = {"label": label, "args": vars(args), "files": {k: [str(p) for p in v] for k, v in files.items()}}
        queue = ctx.Queue()
        proc = ctx.Process(target=_rss_entry, args=(job, queue))
        proc.start()
        while True:
            try:
                status, payload = queue.get(timeout=5)
                break
            except Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"memory worker {label} exited with code {proc.exitcode}") from None
        proc.join()
        if status != "ok":
            raise RuntimeError(f"memory worker {label} failed:\n{payload}")
        out[label] = payload
    return out


# --------------------------------------------------------------------------- timing


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.thread_time() - cpu


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, dict[str, list[float]]]:
    """``repeats`` rounds of every variant, the order rotating by one each round."""
    labels = list(runs)
    times = {label: {"wall": [], "cpu": []} for label in labels}
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            wall, cpu = _timed(runs[label], device)
            times[label]["wall"].append(wall)
            times[label]["cpu"].append(cpu)
            print(f"  round {r + 1}/{repeats} {label:16s} {1e3 * cpu:8.0f} ms cpu {1e3 * wall:8.0f} ms wall", flush=True)
    return times


def ratio(samples: list[float], reference: list[float]) -> dict[str, float]:
    per_round = [a / b for a, b in zip(samples, reference)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}


class OtherLoad:
    """CPU used by other processes while we measured (system busy - ours) / wall, in cores."""

    def __init__(self) -> None:
        import psutil

        self.psutil, self.t0, self.load0 = psutil, time.monotonic(), os.getloadavg()
        self.busy0, self.own0 = self._busy(), self._own()

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def _own(self) -> float:
        t = self.psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def report(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return {"wall_s": round(wall, 1), "other_processes_cores": round(max(other, 0.0) / wall, 2),
                "loadavg_start": round(self.load0[0], 2), "loadavg_end": round(os.getloadavg()[0], 2)}


def op_profile(runs: dict[str, Callable[[], Any]], labels: tuple[str, ...], rounds: int) -> dict[str, dict[str, float]]:
    """Self CPU ms per forward of every operator, per variant (``torch.profiler``, ``rounds`` forwards)."""
    from torch.profiler import ProfilerActivity, profile

    found = {}
    for label in labels:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                runs[label]()
        found[label] = {e.key: e.self_cpu_time_total / 1e3 / rounds for e in prof.key_averages()
                        if e.self_cpu_time_total > 0}
    return found


def op_differences(profiles: dict[str, dict[str, float]], a: str, b: str, top: int = 8) -> dict[str, Any]:
    """The operators whose self time differs most between variants ``a`` and ``b``, and the totals."""
    keys = set(profiles[a]) | set(profiles[b])
    diffs = sorted(keys, key=lambda k: -abs(profiles[a].get(k, 0.0) - profiles[b].get(k, 0.0)))[:top]
    return {"a": a, "b": b, "total_a_ms": sum(profiles[a].values()), "total_b_ms": sum(profiles[b].values()),
            "ops": [{"op": k, "a_ms": profiles[a].get(k, 0.0), "b_ms": profiles[b].get(k, 0.0)} for k in diffs]}


# --------------------------------------------------------------------------- the run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="vpetl-multitask-"))
    base = build_base(args)
    files = write_deltas(base, args, workdir)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(args.device)
    result: dict[str, Any] = {}
    if not args.no_rss:  # first, while this process holds few models (the workers fork from the forkserver)
        print("memory: one fresh process per variant", flush=True)
        result["rss"] = measure_rss(args, files)

    build_s, models, runs = {}, {}, {}
    labels = [label for label in report.TIME_LABELS
              if args.device.startswith("cuda") or label not in report.CUDA_ONLY]
    for label in labels:
        start = time.perf_counter()
        models[label] = build(label, base, files)
        build_s[label] = time.perf_counter() - start
        runs[label] = forward(label, models[label], x, files, args.tasks)
    result["build_s"] = build_s

    # correctness: every sample of a mixed batch against its own task run alone (the warm-up round)
    with torch.inference_mode():
        outs = {label: run() for label, run in runs.items()}
        check = {label: (outs[label] - outs["bapat_separate"]).abs().max().item()
                 for label in ("bapat_mixed", "bapat_mixed_sorted", "bapat_mixed_triton", "bapat_swap_load",
                               "bapat_swap_copy") if label in outs}
        lora, peft_model = models["lora_single"], models["peft_mixed"]
        lora_alone, peft_alone = torch.empty_like(outs["lora_mixed"]), torch.empty_like(outs["peft_mixed"])
        for t in range(args.tasks):
            vpetl.load_delta(lora, files["lora"][t])
            lora_alone[t::args.tasks] = lora(x[t::args.tasks])
            peft_model.set_adapter(f"t{t}")
            peft_alone[t::args.tasks] = peft_model(x[t::args.tasks])
        vpetl.load_delta(lora, files["lora"][0])
        peft_model.set_adapter("t0")
        check["lora_mixed"] = (outs["lora_mixed"] - lora_alone).abs().max().item()
        check["peft_mixed"] = (outs["peft_mixed"] - peft_alone).abs().max().item()
        check["bapat_mixed_vs_base"] = (outs["bapat_mixed"] - outs["base"]).abs().max().item()
    result["max_abs_diff_vs_alone"] = check
    del outs

    print(f"timing: {args.repeats} interleaved rounds of {len(runs)} variants", flush=True)
    load = OtherLoad()
    with torch.inference_mode():
        times = interleaved(runs, args.repeats, args.device)
    result["contention"] = load.report()
    result["raw_times_s"] = times
    if args.device == "cpu":  # where the time goes: self time per operator (CPU only: CUDA time is not CPU time)
        print("profile: torch.profiler, 3 forwards per variant", flush=True)
        with torch.inference_mode():
            profiles = op_profile(runs, ("base", "base_split", "bapat_single", "bapat_mixed"), 3)
        result["profile"] = {"forwards": 3, "mixed_vs_single": op_differences(profiles, "bapat_mixed", "bapat_single"),
                             "base_vs_split": op_differences(profiles, "base", "base_split")}

    clock = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
    t = {label: v[clock] for label, v in times.items()}
    result["clock"] = clock
    result["ms"] = {label: 1e3 * statistics.median(v) for label, v in t.items()}
    result["vs_bapat_single"] = {label: ratio(t[label], t["bapat_single"]) for label in BAPAT_LABELS if label in t}
    result["mixed_vs"] = {label: ratio(t["bapat_mixed"], t[label])
                          for label in ("bapat_swap_load", "bapat_swap_copy", "bapat_separate")}
    result["decomposition"] = {  # what smaller batches alone change, and the branches' cost at each size
        "base_split/base": ratio(t["base_split"], t["base"]),
        "bapat_single/base": ratio(t["bapat_single"], t["base"]),
        "bapat_separate/base_split": ratio(t["bapat_separate"], t["base_split"]),
        "bapat_mixed/base": ratio(t["bapat_mixed"], t["base"]),
    }
    result["lora_vs"] = {
        "lora_mixed/peft_mixed": ratio(t["lora_mixed"], t["peft_mixed"]),
        "lora_mixed/lora_single": ratio(t["lora_mixed"], t["lora_single"]),
        "peft_mixed/peft_single": ratio(t["peft_mixed"], t["peft_single"]),
        "lora_single/peft_single": ratio(t["lora_single"], t["peft_single"]),
        "lora_single/base": ratio(t["lora_single"], t["base"]),
    }
    if args.device == "cpu":  # the wall-clock ratio of the headline, for comparison
        result["bapat_mixed/bapat_single_wall"] = ratio(times["bapat_mixed"]["wall"], times["bapat_single"]["wall"])

    delta = {family: file_tensor_bytes(paths[0]) for family, paths in files.items()}
    mem = {label: state_bytes(models[label]) for label in RSS_LABELS}
    result["memory"] = {"state_dict": mem, "delta_tensor_bytes": delta,
                        "delta_file_bytes": {f: (p[0] / "adapter_model.safetensors" if p[0].is_dir() else p[0]).stat().st_size
                                             for f, p in files.items()}}
    base_b = mem["base"]["bytes"]
    for family in ("bapat", "lora", "peft"):
        budget = base_b + args.tasks * delta[family]
        result["memory"][f"{family}_budget_bytes"] = budget
        result["memory"][f"{family}_mixed_vs_budget"] = mem[f"{family}_mixed"]["bytes"] / budget
    result["memory"]["bapat_mixed_vs_separate"] = mem["bapat_mixed"]["bytes"] / mem["bapat_separate"]["bytes"]
    result["memory"]["lora_mixed_vs_peft_mixed"] = mem["lora_mixed"]["bytes"] / mem["peft_mixed"]["bytes"]
    result["targets"] = report.targets(result, args)
    return result


# --------------------------------------------------------------------------- output


def metadata(args: argparse.Namespace) -> dict[str, Any]:
    import peft

    provenance = _sibling("provenance")
    return {
        **provenance.machine_state(args.device),
        "torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__, "vpetl": vpetl.__version__,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "command": " ".join(["python benchmarks/multitask.py", *sys.argv[1:]]),
        **provenance.git_state(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Usage:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n] (default cpu)")
    parser.add_argument("--model", default="vit_small_patch16_224", help="a timm ViT (default vit_small_patch16_224)")
    parser.add_argument("--repeats", type=int, help="timed interleaved rounds (default 7; --quick 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU; 0: torch's default)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks (default 8)")
    parser.add_argument("--batch", type=int, help="batch size, a multiple of --tasks (default 32; --quick 16)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (2 blocks, 32 px): a smoke test in seconds")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process memory measurement")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the .md and .png next to a results JSON")
    parser.add_argument("--out", help="output stem (default benchmarks/results/multitask_<device>; --quick: temp folder)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.batch = args.batch or (16 if args.quick else 32)
    args.size = 32 if args.quick else 224
    args.threads = (1 if args.device == "cpu" else 0) if args.threads is None else args.threads
    if args.batch % args.tasks:
        parser.error(f"--batch {args.batch} is not a multiple of --tasks {args.tasks}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        data, stem = json.loads(Path(args.render).read_text()), Path(args.render).with_suffix("")
        stem.with_suffix(".md").write_text(report.markdown(data["meta"], data["result"]))
        report.plot(data["meta"], data["result"], stem.with_suffix(".png"))
        print(f"wrote {stem}.md, .png")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    start = time.perf_counter()
    meta = metadata(args)
    result = measure(args)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    default = Path(tempfile.gettempdir()) / "vpetl_multitask_quick" if args.quick else RESULTS
    stem = Path(args.out) if args.out else default / f"multitask_{args.device.split(':')[0]}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")
    text = report.markdown(meta, result)
    stem.with_suffix(".md").write_text(text)
    report.plot(meta, result, stem.with_suffix(".png"))
    print(text)
    print(f"wrote {stem}.json, .md, .png ({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
