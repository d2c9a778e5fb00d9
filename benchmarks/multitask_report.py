"""Targets, Markdown and plot of ``benchmarks/multitask.py`` (the variants' labels live here too)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NUM_CLASSES = 10
BAPAT_LABELS = ("base", "base_split", "bapat_single", "bapat_mixed", "bapat_mixed_sorted", "bapat_mixed_triton",
                "bapat_swap_load", "bapat_swap_copy", "bapat_separate")
CUDA_ONLY = ("bapat_mixed_triton",)  # the grouped Triton kernel: timed on a GPU only
LORA_LABELS = ("lora_single", "lora_mixed", "peft_single", "peft_mixed")
TIME_LABELS = BAPAT_LABELS + LORA_LABELS
RSS_LABELS = ("base", "bapat_single", "bapat_mixed", "bapat_separate", "lora_single", "lora_mixed",
              "peft_single", "peft_mixed")
DESCRIBE = {
    "base": "(e) plain base, whole batch",
    "base_split": "(e') plain base, T sub-batches (the batch-size effect alone)",
    "bapat_single": "(b) one BAPAT-64 injected, whole batch",
    "bapat_mixed": "(a) T BAPAT-64 tasks, `vpetl.route` per sample, whole batch",
    "bapat_mixed_sorted": "(a') as (a), the batch sorted by task first (each task's rows one slice), outputs put back",
    "bapat_mixed_triton": "(a'') as (a), `kernel='triton'`: the grouped PATT kernel",
    "bapat_swap_load": "(c) one injected model, `load_delta` of each task's file, then its sub-batch",
    "bapat_swap_copy": "(c') one injected model, `copy_` of each task's tensors, then its sub-batch",
    "bapat_separate": "(d) T separate models, each runs its sub-batch",
    "lora_single": "vpetl LoRA-16 (q, v), one task injected, whole batch",
    "lora_mixed": "vpetl LoRA-16 (q, v), T tasks, `vpetl.route` per sample",
    "peft_single": "PEFT LoRA-16 (whole qkv), one adapter, whole batch",
    "peft_mixed": "PEFT LoRA-16 (whole qkv), T adapters, `adapter_names` per sample",
}



def targets(res: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    m = res["memory"]
    r = res["vs_bapat_single"]["bapat_mixed"]
    rows = [
        ("(a) mixed batch / (b) single task <= 1.15", r, r["median"] <= 1.15),
        ("(a) mixed batch faster than (c) swapping with load_delta: (a)/(c) < 1", res["mixed_vs"]["bapat_swap_load"],
         res["mixed_vs"]["bapat_swap_load"]["median"] < 1),
        ("(a) mixed batch faster than (c') swapping with copy_: (a)/(c') < 1", res["mixed_vs"]["bapat_swap_copy"],
         res["mixed_vs"]["bapat_swap_copy"]["median"] < 1),
        ("(a) mixed batch faster than (d) separate models: (a)/(d) < 1", res["mixed_vs"]["bapat_separate"],
         res["mixed_vs"]["bapat_separate"]["median"] < 1),
        (f"memory, {args.tasks} BAPAT-64 tasks <= 1.10 x (base + {args.tasks} x delta)",
         {"median": m["bapat_mixed_vs_budget"]}, m["bapat_mixed_vs_budget"] <= 1.10),
        (f"memory, {args.tasks} LoRA-16 tasks <= 1.10 x (base + {args.tasks} x delta)",
         {"median": m["lora_mixed_vs_budget"]}, m["lora_mixed_vs_budget"] <= 1.10),
        ("vpetl LoRA-16 mixed batch <= PEFT LoRA-16 mixed batch (time)", res["lora_vs"]["lora_mixed/peft_mixed"],
         res["lora_vs"]["lora_mixed/peft_mixed"]["median"] <= 1),
        ("vpetl LoRA-16 mixed model <= PEFT mixed model (memory)", {"median": m["lora_mixed_vs_peft_mixed"]},
         m["lora_mixed_vs_peft_mixed"] <= 1),
    ]
    out = []
    for name, value, ok in rows:
        straddles = "min" in value and (value["min"] <= (1.15 if "1.15" in name else 1.0) <= value["max"])
        out.append({"target": name, "measured": value, "pass": bool(ok), "range_straddles_limit": bool(straddles)})
    return out


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _r(v: dict[str, float]) -> str:
    return f"{v['median']:.3f} [{v['min']:.2f}-{v['max']:.2f}]" if "min" in v else f"{v['median']:.3f}"


def markdown(meta: dict[str, Any], res: dict[str, Any]) -> str:
    s, c, T = meta["settings"], res["contention"], meta["settings"]["tasks"]
    clock = "the main thread's CPU time (`time.thread_time`), one torch thread" if res["clock"] == "cpu" else \
        "wall-clock" + (", CUDA-synchronised" if meta["device"].startswith("cuda") else "")
    lines = [
        f"# Many tasks on one backbone: mixed batch vs the alternatives ({meta['device_name']})", "",
        (f"{meta['date']}, torch {meta['torch']}, timm {meta['timm']}, peft {meta['peft']}, vpetl {meta['vpetl']} at "
        f"{meta['git_commit']}{' + uncommitted ' + ', '.join(meta['src_uncommitted']) if meta['src_uncommitted'] else ''}, "
        f"Python {meta['python']}, {meta['processor']}, {meta['cpu_count']} cores. `{meta['command']}`"), "",
        (f"`{s['model']}`{' (quick: 2 blocks)' if s['quick'] else ''}, seeded random weights, {NUM_CLASSES} classes, "
        f"batch {s['batch']} at {s['size']} px, eval + `inference_mode`; {T} tasks, sample i -> task i % {T} "
        f"({s['batch'] // T} samples each). Times: {clock}; medians over {s['repeats']} interleaved rounds "
        f"(after one warm-up round); ratios are medians of per-round ratios, `[min-max]` their range. Other "
        f"processes used {c['other_processes_cores']} cores on average while timing (load average "
        f"{c['loadavg_start']} -> {c['loadavg_end']}, {c['wall_s']:.0f} s)."), "",
        "## Time, BAPAT-64", "",
        "| variant | ms / batch | / (b) [min-max] | (a) / this [min-max] |", "|---|---:|---:|---:|",
    ]
    for label in (label for label in BAPAT_LABELS if label in res["ms"]):
        mixed = res["mixed_vs"].get(label)
        lines.append(f"| {DESCRIBE[label]} | {res['ms'][label]:.0f} | {_r(res['vs_bapat_single'][label])} | "
                     f"{_r(mixed) if mixed else '-'} |")
    dec = res["decomposition"]
    split, branch_b, branch_s = (dec[k]["median"] for k in ("base_split/base", "bapat_single/base",
                                                              "bapat_separate/base_split"))
    lines += ["", "| ratio | median [min-max] |", "|---|---:|"]
    lines += [f"| {name} | {_r(v)} |" for name, v in dec.items()]
    lines += ["", (f"What this means: the plain base run as {T} sub-batches of {s['batch'] // T} costs {split:.3f} of one "
              f"batch of {s['batch']} on this {'machine' if meta['device'] == 'cpu' else 'device'} "
              f"({'smaller batches are cheaper per sample here' if split < 1 else 'one large batch is cheaper per sample here'}"
              f"). (c) and (d) get that for free, (a) and (b) do not. BAPAT-64 costs {branch_b:.3f} of the base at batch "
              f"{s['batch']} and {branch_s:.3f} at {s['batch'] // T}; (a) / (b) = "
              f"{res['vs_bapat_single']['bapat_mixed']['median']:.3f} is what routing {T} tasks in one batch adds "
              "(gathering each task's rows, its branch on them, scattering back; the heads per task).")]
    prof = res.get("profile")
    if prof:
        lines += ["", "## Where the time goes", "",
                  f"`torch.profiler` self CPU time per forward (mean of {prof['forwards']} forwards, after the timed "
                  "rounds; the profiler adds its own overhead, so compare within a table).", ""]
        for key, what in (("mixed_vs_single", "what routing adds: (a) against (b), the operators that differ most"),
                          ("base_vs_split", f"what one batch of {s['batch']} costs against {T} sub-batches of "
                                            f"{s['batch'] // T}: (e) against (e')")):
            d = prof[key]
            lines += [f"{what}; totals {d['total_a_ms']:.0f} ms vs {d['total_b_ms']:.0f} ms "
                      f"({d['total_a_ms'] - d['total_b_ms']:+.0f} ms):", "",
                      f"| operator | {d['a']} ms | {d['b']} ms | difference ms |", "|---|---:|---:|---:|"]
            lines += [f"| `{o['op']}` | {o['a_ms']:.1f} | {o['b_ms']:.1f} | {o['a_ms'] - o['b_ms']:+.1f} |"
                      for o in d["ops"]]
            lines.append("")
        lines.pop()
    lines += ["", "## Time, LoRA-16 vs PEFT", "",
              ("vpetl puts rank-16 pairs on the q and v slots of the fused qkv, PEFT on the whole qkv Linear: the same "
              "parameter count and FLOPs per token, different placement. Both train the head. PEFT's `adapter_names` "
              "works on the timm model: `PeftModel.forward` pops it and registers forward pre-hooks on its LoRA layers "
              "and on the `modules_to_save` head wrapper, which split the batch by adapter; the timm forward never sees it."),
              "",
              "| variant | ms / batch |", "|---|---:|"]
    lines += [f"| {DESCRIBE[label]} | {res['ms'][label]:.0f} |" for label in LORA_LABELS]
    lines += ["", "| ratio | median [min-max] |", "|---|---:|"]
    lines += [f"| {name} | {_r(v)} |" for name, v in res["lora_vs"].items()]
    m = res["memory"]
    rss = res.get("rss", {})
    lines += ["", "## Memory", "",
              f"State dict bytes, each storage counted once (`shared`: entries that repeat a storage). Delta tensor "
              f"bytes per task: BAPAT-64 {_mb(m['delta_tensor_bytes']['bapat'])} MB, LoRA-16 "
              f"{_mb(m['delta_tensor_bytes']['lora'])} MB, PEFT {_mb(m['delta_tensor_bytes']['peft'])} MB "
              f"(files: {', '.join(f'{k} {_mb(v)} MB' for k, v in m['delta_file_bytes'].items())})."
              + (" RSS columns: one fresh process per model, the resident-set increase of building it and the "
                 "peak increase during one forward of the batch." if rss else ""), "",
              ("| model | state dict MB | shared | / (base + T x delta) | built (RSS) MB | of which file-backed MB "
              "| forward peak MB |"),
              "|---|---:|---:|---:|---:|---:|---:|"]
    for label in RSS_LABELS:
        sd, family = m["state_dict"][label], label.split("_")[0]
        budget = f"{sd['bytes'] / m[family + '_budget_bytes']:.3f}" if label.endswith("mixed") else "-"
        r = rss.get(label)
        lines.append(f"| {label}{' (x' + str(T) + ')' if label == 'bapat_separate' else ''} | {_mb(sd['bytes'])} | "
                     f"{sd['shared']} | {budget} | {_mb(r['built_bytes']) if r else '-'} | "
                     f"{_mb(r['built_file_backed_bytes']) if r else '-'} | "
                     f"{_mb(r['forward_peak_bytes']) if r else '-'} |")
    lines += ["", (f"{T} BAPAT tasks in one model: {m['bapat_mixed_vs_separate']:.3f} of {T} separate models' bytes. "
              f"vpetl LoRA mixed / PEFT mixed bytes: {m['lora_mixed_vs_peft_mixed']:.3f}.")]
    if rss:
        over = rss["bapat_mixed"]["built_bytes"] - rss["base"]["built_bytes"]
        files = rss["bapat_mixed"]["built_file_backed_bytes"] - rss["bapat_separate"]["built_file_backed_bytes"]
        mapped = ("delta files still memory-mapped after `load_delta(..., task=)`" if files > 2**20 else
                  "no delta file stays mapped after `load_delta(..., task=)`")
        lines[-1] += (f" Resident, the {T} BAPAT tasks add {_mb(over)} MB over the base's process against "
                      f"{_mb(T * m['delta_tensor_bytes']['bapat'])} MB of delta tensors; their file-backed part is "
                      f"{_mb(files)} MB above that of the {T} separate models (which load the same {T} files and run "
                      f"the same code): {mapped}.")
    lines += ["", "## Targets", "", "| target | measured [min-max] | |", "|---|---:|---|"]
    for t in res["targets"]:
        verdict = "pass" if t["pass"] else "**miss**"
        if t["range_straddles_limit"]:
            verdict += " (the range straddles the limit)"
        lines.append(f"| {t['target']} | {_r(t['measured'])} | {verdict} |")
    d = res["max_abs_diff_vs_alone"]
    lines += ["", "Correctness (max abs difference of the mixed batch's logits against the same samples run alone "
              "through their task): " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()) + " (`bapat_mixed_vs_base`: "
              "how much the perturbed deltas change the output).", "",
              "Build times (s): " + ", ".join(f"{k} {v:.2f}" for k, v in res["build_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(meta: dict[str, Any], res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [5, 4, 5]})
    for ax, items, title, ref in (
        (ax1, [(k.replace("bapat_", ""), v) for k, v in res["vs_bapat_single"].items()],
         "BAPAT-64: time / (b) single task", 1.15),
        (ax2, [(k.replace("/", "\n/ "), v) for k, v in res["lora_vs"].items() if "base" not in k],
         "LoRA-16: time ratios (target: the first <= 1)", 1.0),
    ):
        names, med = [n for n, _ in items], [v["median"] for _, v in items]
        err = [[v["median"] - v["min"] for _, v in items], [v["max"] - v["median"] for _, v in items]]
        colours = ["tab:purple" if "mixed" in n else "tab:grey" for n in names]
        ax.bar(names, med, yerr=err, capsize=4, color=colours)
        ax.axhline(ref, color="red", lw=0.8, ls="--", label=f"target {ref}")
        ax.axhline(1.0, color="black", lw=0.6, ls=":")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.legend(fontsize=7)
    m, T = res["memory"], meta["settings"]["tasks"]
    labels = ["base", "bapat_single", "bapat_mixed", "bapat_budget", "bapat_separate", "lora_mixed", "peft_mixed"]
    values = [m[f"{label.split('_')[0]}_budget_bytes"] if label.endswith("budget") else m["state_dict"][label]["bytes"]
              for label in labels]
    ax3.bar([n.replace("budget", f"base+{T}xdelta").replace("separate", f"separate x{T}") for n in labels],
            [v / 2**20 for v in values], color=["grey", "grey", "tab:purple", "white", "tab:grey", "tab:orange",
                                                "tab:red"], edgecolor="black")
    ax3.set_ylabel("state dict MB")
    ax3.set_title(f"memory, {T} tasks", fontsize=10)
    ax3.tick_params(axis="x", labelsize=7, rotation=30)
    fig.suptitle(f"vpetl many tasks on one backbone, {meta['settings']['model']} b{meta['settings']['batch']}, "
                 f"{meta['device_name']}, {meta['date'][:10]}, {res['clock']} clock", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

