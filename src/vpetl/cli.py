"""The ``vpetl`` command: count parameters per method, show what ``inject`` would adapt, inspect deltas.

::

    vpetl params swin3d_b --num-classes 174 --method bapat --d-bottle 32
    vpetl params vit_base_patch16_224 --method all
    vpetl targets swin3d_t
    vpetl inspect delta.safetensors

Models are built with random weights (nothing is downloaded), on PyTorch's ``meta`` device where
that works (no memory is allocated: counting only) and on the CPU otherwise. A name is looked up in
timm first, then in torchvision (image and video classification); prefix it with ``timm:`` or
``torchvision:`` to choose. Errors are one line on stderr, ``vpetl: error: <reason>``, exit code 1
(argparse's usage errors: exit code 2). Set ``VPETL_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
import struct
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import POSITION_LETTERS, TunePosition
from .errors import VpetlError
from .presets import METHODS, OPTIONS

PROG = "vpetl"
ALL = "all"


class CliError(Exception):
    """A bad input the command reports as one line and exit code 1."""


# --------------------------------------------------------------------------- models


def _torchvision_names() -> list[str]:
    from torchvision.models import list_models

    return sorted(set(list_models()))


def build_model(name: str, num_classes: int | None = None, img_size: int | None = None,
                device: str = "meta") -> tuple[nn.Module, str]:
    """A random-weight model by name and the library that built it ("timm" or "torchvision").

    ``device="meta"`` allocates no memory (enough to count parameters and find targets); if the
    model cannot be built there it is built on the CPU.
    """
    library, _, bare = name.partition(":") if ":" in name else ("", "", name)
    if library not in ("", "timm", "torchvision"):
        raise CliError(f"unknown model library {library!r} in {name!r}; use timm:NAME or torchvision:NAME.")
    import timm

    if library == "timm" or (not library and timm.is_model(bare)):
        library = "timm"
        kwargs: dict[str, Any] = {"pretrained": False}
        if img_size is not None:
            kwargs["img_size"] = img_size
        build = lambda: timm.create_model(bare, **kwargs, **_classes(num_classes))  # noqa: E731
    elif library == "torchvision" or bare in _torchvision_names():
        from torchvision.models import get_model

        if bare not in _torchvision_names():
            raise CliError(f"unknown torchvision model {bare!r}{_suggest(bare, _torchvision_names())}.")
        library = "torchvision"
        kwargs = {"weights": None, **({"image_size": img_size} if img_size is not None else {})}
        build = lambda: get_model(bare, **kwargs, **_classes(num_classes))  # noqa: E731
    else:
        known = timm.list_models() + _torchvision_names()
        raise CliError(
            f"unknown model {bare!r}: neither a timm model nor a torchvision model{_suggest(bare, known)}. "
            "`timm.list_models('*vit*')` and `torchvision.models.list_models()` list the names."
        )
    errors = []
    for where in dict.fromkeys([device, "cpu"]):
        try:
            with torch.device(where):
                return build(), library
        except Exception as error:  # noqa: BLE001 - any construction failure becomes one line
            errors.append(f"{type(error).__name__}: {error}")
    raise CliError(f"cannot build {library} model {bare!r}: {errors[-1]}")


def _classes(num_classes: int | None) -> dict[str, int]:
    return {} if num_classes is None else {"num_classes": num_classes}


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _on_cpu(model: nn.Module) -> bool:
    return all(p.device.type != "meta" for p in model.parameters())


# --------------------------------------------------------------------------- vpetl params


def _method_options(args: argparse.Namespace, method: str, strict: bool) -> dict[str, Any]:
    """The inject options given on the command line; with ``strict=False`` (``--method all``)
    only those that apply to ``method``."""
    letters = args.positions and all(set(p) <= set(POSITION_LETTERS) for p in args.positions)
    positions = None
    if args.positions:
        positions = "".join(args.positions) if letters else list(args.positions)
    given = {
        "d_bottle": args.d_bottle, "scale": args.scale, "positions": positions, "length": args.length,
        "deep": True if args.deep else None, "variant": args.variant, "tokens": args.tokens,
        "activation": args.activation, "learnable_scale": True if args.learnable_scale else None,
        "placement": args.placement,
    }
    out = {k: v for k, v in given.items() if v is not None}
    if not strict:
        out = {k: v for k, v in out.items() if method in OPTIONS[k]}
        if "positions" in out and (method == "tune") == bool(letters):
            del out["positions"]  # letters are for patt/bapat/lora, position names for tune
    return out


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _inject_count(base: nn.Module, method: str, options: dict[str, Any], train_head: bool) -> tuple[int, int]:
    """(trainable, total) parameters after injecting ``method`` into a copy of ``base``."""
    import vpetl

    model = copy.deepcopy(base)
    vpetl.inject(model, method, train_head=train_head, **options)
    return _trainable(model), sum(p.numel() for p in model.parameters())


def _tune_positions(base: nn.Module, train_head: bool) -> list[str]:
    """The Table 1 positions ``tune`` finds in ``base`` (each tried alone)."""
    found = []
    for position in TunePosition:
        try:
            _inject_count(base, "tune", {"positions": [position.value]}, train_head)
        except Exception:  # noqa: BLE001 - a position the model lacks
            continue
        found.append(position.value)
    return found


def _count_row(args: argparse.Namespace, base: nn.Module, method: str, options: dict[str, Any]) -> tuple[int, int]:
    """(trainable, total) for one method; on the meta device, a non-vpetl failure is retried on the CPU."""
    try:
        return _inject_count(base, method, options, not args.no_head)
    except VpetlError:
        raise
    except Exception:  # noqa: BLE001 - meta tensors may be the problem: retry once on real ones
        if _on_cpu(base):
            raise
        cpu = build_model(args.model, args.num_classes, args.img_size, device="cpu")[0]
        return _inject_count(cpu, method, options, not args.no_head)


def cmd_params(args: argparse.Namespace) -> int:
    from .heads import find_head_paths

    if args.method != ALL and args.method not in METHODS:
        raise CliError(f"unknown method {args.method!r}; accepted: {', '.join(METHODS)}, all.")
    base, library = build_model(args.model, args.num_classes, args.img_size)
    base_total = sum(p.numel() for p in base.parameters())
    rows: list[tuple[str, int | None, int | None, str]] = []
    for method in METHODS if args.method == ALL else (args.method,):
        options = _method_options(args, method, strict=args.method != ALL)
        note = ""
        if method == "tune" and args.method == ALL and "positions" not in options:
            positions = _tune_positions(base, not args.no_head)
            if not positions:
                rows.append((method, None, None, "skipped: the model has none of the Table 1 positions"))
                continue
            options["positions"], note = positions, "positions: " + ",".join(positions)
        try:
            rows.append((method, *_count_row(args, base, method, options), note))
        except Exception as error:  # noqa: BLE001 - with --method all, a row says why instead of crashing
            if args.method != ALL:
                raise
            reason = _one_line(error)
            same = next((r[0] for r in rows if r[3] == reason), None)
            rows.append((method, None, None, reason if same is None else f"same as {same}"))
    heads = find_head_paths(base)
    head = f"; head: {', '.join(heads)} ({'frozen' if args.no_head else 'trained'})" if heads else "; no head"
    print(f"{args.model} ({library} {type(base).__name__}): {base_total:,} parameters ({_millions(base_total)}){head}")
    _print_params_table(rows, base_total)
    return 0


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 5e3 else f"{n / 1e3:.2f}K"


def _print_params_table(rows: list[tuple[str, int | None, int | None, str]], base_total: int) -> None:
    header = ("method", "trainable", "", "total", "% of base", "")
    table = [header]
    for method, trainable, total, note in rows:
        if trainable is None:
            table.append((method, "-", "", "-", "-", note))
        else:
            percent = f"{100 * trainable / base_total:.2f}%" if base_total else "-"
            table.append((method, f"{trainable:,}", f"({_millions(trainable)})", f"{total:,}", percent, note))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:5], widths[1:5])] + [row[5]]
        print("  ".join(cells).rstrip())


# --------------------------------------------------------------------------- vpetl targets


def cmd_targets(args: argparse.Namespace) -> int:
    from .handlers.mlp import locate_mlp
    from .heads import find_head_paths
    from .handlers.sites import find_attention, why_unhandled as _why_unhandled

    model, library = build_model(args.model, args.num_classes, args.img_size)
    sites, unhandled = find_attention(model)
    print(f"{args.model} ({library} {type(model).__name__})")
    print(f"\nattention sites ({len(sites)}): PATT / LoRA / prefix branches go here")
    rows = [("path", "class", "handler", "d_in", "q/k/v widths")]
    mlps, seen = [], set()
    for site in sites:
        try:
            spec = site.handler.spec(site.module)
            d_in, widths = str(spec.d_in), " ".join(f"{c}={w}" for c, w in spec.widths.items())
        except Exception as error:  # noqa: BLE001 - shown, not fatal
            d_in, widths = "?", f"cannot describe: {_one_line(error)}"
        rows.append((_path(site.path), type(site.module).__name__, site.handler.name, d_in, widths))
        mlp = locate_mlp(model, site.path)
        if mlp is not None and mlp.path not in seen:
            seen.add(mlp.path)
            inner = getattr(mlp, "mlp", None) or mlp.module
            mlps.append((_path(mlp.path), type(inner).__name__, f"{mlp.d_in} -> {mlp.d_out}",
                         f"{mlp.path + '.' if mlp.path else ''}vpetl_adapter"))
        elif mlp is None:
            mlps.append((_path(site.path), "-", "-", "no MLP found beside this attention: the adapter cannot go here"))
    if sites:
        _print_rows(rows)
    else:
        print("  (none: inject raises for branch methods; 'linear', 'bitfit' and 'full' still apply)")
    print(f"\nMLPs the adapter sits beside ({len(seen)})")
    _print_rows([("block", "MLP class", "width", "adapter registered as")] + mlps)
    print(f"\nattention-like modules skipped ({len(unhandled)})")
    _print_rows([("path", "class", "reason")] + [(_path(p), type(m).__name__, _why_unhandled(m)) for p, m in unhandled])
    heads = find_head_paths(model)
    print(f"\nhead: {', '.join(heads) if heads else 'none found'}"
          + (" (trained by default; train_head=False freezes it)" if heads else ""))
    return 0


def _path(path: str) -> str:
    return path or "<root>"


def _print_rows(rows: list[tuple[str, ...]]) -> None:
    """A left-aligned table; the header row alone prints as "(none)"."""
    if len(rows) == 1:
        print("  (none)")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


# --------------------------------------------------------------------------- vpetl inspect

def delta_info(path: Path) -> dict[str, Any]:
    """Everything ``vpetl inspect`` reports about a delta file, from its header alone."""
    from .delta import read_header
    from .heads import ROOT_HEAD_NAMES

    metadata, names = read_header(path)  # validates: exists, not truncated, a vpetl delta
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    dtypes = Counter(v["dtype"] for v in entries.values())
    values = sum(_numel(v["shape"]) for v in entries.values())
    data_bytes = sum(int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for v in entries.values())
    try:
        config = json.loads(metadata["config"])
        shapes = json.loads(metadata["base_shapes"])
        checksums = json.loads(metadata["base_checksum"])
    except ValueError as error:
        raise CliError(f"{path}: corrupt vpetl metadata ({error}).") from None
    shapes_text = json.dumps(shapes, sort_keys=True, separators=(",", ":"))
    trunk = {k: v for k, v in shapes.items() if k.split(".")[0] not in ROOT_HEAD_NAMES}
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "format": f"{metadata['format']} v{metadata['format_version']}",
        "vpetl_version": metadata["vpetl_version"],
        "model_class": metadata.get("model_class", "?"),
        "method": config.get("method", "?"),
        "config": config,
        "base": {
            "parameters": len(shapes),
            "values": sum(_numel(s) for s in shapes.values()),
            "shapes_sha256": hashlib.sha256(shapes_text.encode()).hexdigest()[:16],
            "checksummed": len(checksums),
        },
        "base_trunk": hashlib.sha256(json.dumps(trunk, sort_keys=True).encode()).hexdigest()[:16],
        "tensors": {"count": len(names), "values": values, "bytes": data_bytes, "dtypes": dict(sorted(dtypes.items()))},
        "tensor_list": [{"name": n, "dtype": entries[n]["dtype"], "shape": entries[n]["shape"]} for n in names],
    }


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _config_lines(config: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in config.items():
        if key == "methods" and isinstance(value, list):  # format 2: one line per method entry
            for entry in value:
                options = {k: v for k, v in entry.items() if k != "name" and v is not None}
                lines.append(f"{entry.get('name')}: " + (", ".join(f"{k}={v}" for k, v in options.items()) or "(no options)"))
            continue
        if key == "method" or value is None or value == [] or value is False and key != "train_head":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        lines.append(f"{key}: {value}")
    return lines


def tasks_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether several delta files can be loaded as tasks of one model (``load_delta(..., task=)``):
    one row per file (task name = file stem, method, trained values) and the verdict."""
    from .config import InjectConfig
    from .errors import ConfigError
    from .multitask import check_routable

    rows, problems = [], []
    bases = set()
    for info in infos:
        name = Path(info["path"]).stem
        try:
            check_routable(InjectConfig.from_dict(info["config"]), name)
            routable = True
        except ConfigError as error:
            routable = False
            problems.append(f"{name} ({info['method']}) cannot be routed per sample beside other tasks ({error})")
        rows.append({"task": name, "method": info["method"], "values": info["tensors"]["values"],
                     "bytes": info["tensors"]["bytes"], "routable": routable})
        bases.add(info["base_trunk"])
    if len(bases) > 1:
        problems.append("the files were saved from different base architectures (the heads aside)")
    return {"tasks": rows, "one_model": not problems, "problems": problems}


def cmd_inspect(args: argparse.Namespace) -> int:
    infos = [delta_info(Path(f)) for f in args.file]
    together = tasks_info(infos) if len(infos) > 1 else None
    if args.json:
        shown = [info if args.tensors else {k: v for k, v in info.items() if k != "tensor_list"} for info in infos]
        print(json.dumps(shown[0] if together is None else {"files": shown, **together}, indent=2))
        return 0
    for index, info in enumerate(infos):
        if index:
            print()
        _print_inspect(info, args.tensors)
    if together is not None:
        print()
        _print_rows([("task", "method", "trained values", "size", "routable"),
                     *[(r["task"], r["method"], f"{r['values']:,}", human_bytes(r["bytes"]), "yes" if r["routable"] else "no")
                       for r in together["tasks"]]])
        verdict = ("these deltas can be loaded as tasks of one model: vpetl.load_delta(model, path, task=name)"
                   if together["one_model"] else "not as tasks of one model: " + "; ".join(together["problems"]))
        print(verdict)
    return 0


def _print_inspect(info: dict[str, Any], tensors_too: bool) -> None:
    base, tensors = info["base"], info["tensors"]
    dtypes = ", ".join(f"{d} ({n})" for d, n in tensors["dtypes"].items())
    fields = [
        ("file", f"{info['path']} ({info['file_bytes']:,} bytes, {human_bytes(info['file_bytes'])})"),
        ("format", f"{info['format']}, written by vpetl {info['vpetl_version']}"),
        ("method", info["method"]),
    ]
    fields += [("", line) for line in _config_lines(info["config"])]
    fields += [
        ("base model", f"{info['model_class']}: {base['parameters']} parameter tensors, {base['values']:,} values"),
        ("fingerprint", f"shapes sha256 {base['shapes_sha256']}, "
                        f"value checksums of {base['checksummed']} frozen tensors"),
        ("tensors", f"{tensors['count']} tensors, {tensors['values']:,} values, {tensors['bytes']:,} bytes "
                    f"({human_bytes(tensors['bytes'])})"),
        ("dtypes", dtypes or "-"),
    ]
    for label, value in fields:
        print(f"{label:<12} {value}")
    if tensors_too:
        print()
        listing = [(t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar") for t in info["tensor_list"]]
        _print_rows([("name", "dtype", "shape"), *listing])


# --------------------------------------------------------------------------- argparse


def _int_at_least(minimum: int, what: str):
    """An argparse ``type`` accepting integers >= ``minimum``, described as ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="timm name (vit_base_patch16_224) or torchvision name (swin3d_b, vit_b_16, mvit_v2_s); "
                             "prefix timm: or torchvision: to choose")
    parser.add_argument("--num-classes", type=_non_negative, metavar="C",
                        help="classes of the head (default: the model's; 0 = no head where the library allows)")
    parser.add_argument("--img-size", type=_positive, metavar="S",
                        help="input size the model is built for (timm img_size, torchvision image_size)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="vpetl: parameter-efficient transfer learning for vision transformers.",
        epilog="Models are built with random weights on the meta device (nothing is downloaded). "
               "Errors print one line; set VPETL_DEBUG=1 for a traceback.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    params = sub.add_parser(
        "params", help="trainable / total parameters of a model per method",
        description=textwrap.fill(
            "Build MODEL with random weights, inject METHOD into a fresh copy and print trainable and total "
            "parameters (like the V-PETL paper's tables). With --method all, one row per method; options apply to "
            "the methods that accept them, tune unfreezes every Table 1 position the model has, and a method that "
            "does not fit the model prints the reason in its row.", 79),
        epilog="examples:\n  vpetl params swin3d_b --num-classes 174 --method bapat --d-bottle 32\n"
               "  vpetl params vit_base_patch16_224 --num-classes 51 --method all\n"
               "  vpetl params swin3d_b --method patt --variant no_input --tokens 196\n"
               "  vpetl params vit_b_16 --method tune --positions attn_qkv norm2 --no-head",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(params)
    params.add_argument("--method", default="bapat", metavar="M",
                        help=f"one of {', '.join(METHODS)}, or all (default: bapat)")
    params.add_argument("--d-bottle", type=_positive, metavar="N",
                        help="bottleneck width / LoRA rank (default: patt/bapat/prefix 128, adapter 64, lora 16)")
    params.add_argument("--scale", type=float, metavar="S", help="branch scale s (patt/bapat/adapter/lora)")
    params.add_argument("--positions", nargs="+", metavar="P",
                        help="letters from qkv for patt/bapat/lora (kv), or Table 1 positions for tune: "
                             + ", ".join(p.value for p in TunePosition))
    params.add_argument("--length", type=_positive, metavar="L", help="prefix / prompt tokens (prefix, vpt)")
    params.add_argument("--deep", action="store_true", help="vpt: prompts before every block")
    params.add_argument("--variant", choices=("add", "concat", "no_input"), help="PATT variant (Table 6)")
    params.add_argument("--tokens", type=_positive, metavar="T", help="tokens per attention call (variant no_input)")
    params.add_argument("--activation", choices=("tanh", "relu", "gelu"), help="branch nonlinearity")
    params.add_argument("--learnable-scale", action="store_true", help="train the branch scale s")
    params.add_argument("--placement", choices=("parallel", "sequential"), help="adapter placement")
    params.add_argument("--no-head", action="store_true", help="freeze the classification head")
    params.set_defaults(func=cmd_params)

    targets = sub.add_parser(
        "targets", help="what inject would adapt in a model",
        description="List the attention modules inject adapts (path, class, handler, q/k/v widths), the MLPs "
                    "the adapter sits beside, the attention-like modules it skips (with the reason) and the head.",
    )
    _add_model_args(targets)
    targets.set_defaults(func=cmd_targets)

    inspect = sub.add_parser(
        "inspect", help="metadata of a delta file",
        description="Read a delta file's header (no tensor data): vpetl version, method and config, the base "
                    "model fingerprint, tensor count, size and dtypes.",
    )
    inspect.add_argument("file", metavar="DELTA", nargs="+",
                         help="a .safetensors file written by vpetl.save_delta; several: also whether they can be "
                              "loaded as tasks of one model")
    inspect.add_argument("--tensors", action="store_true", help="also list every tensor (name, dtype, shape)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=cmd_inspect)

    methods = sub.add_parser(
        "methods", help="the registered methods: paper, parameter count, options, merge",
        description="Every method vpetl registers (one file each in vpetl/methods) and the presets built from "
                    "them: where it comes from, its parameter count, its options with their defaults, and "
                    "whether vpetl.merge folds it into the base weights.",
    )
    methods.add_argument("--json", action="store_true", help="print JSON instead of text")
    methods.set_defaults(func=cmd_methods)
    return parser


def method_rows() -> list[dict[str, Any]]:
    """One row per preset: its entries' paper, count formula, options (defaults) and mergeability."""
    import dataclasses

    from .presets import PRESETS

    rows = []
    for name, preset_ in PRESETS.items():
        entries = preset_.entries
        options = {}
        for cls in entries:
            for f in dataclasses.fields(cls):
                key = "d_bottle" if f.name == cls.width_field else f.name
                default = f.default if f.default is not dataclasses.MISSING else None
                options.setdefault(key, getattr(default, "value", default))
        rows.append({
            "method": name,
            "paper": preset_.summary,
            "count": "; ".join(cls.formula for cls in entries) or "the head only",
            "options": options,
            "mergeable": all(cls.mergeable for cls in entries),
        })
    return rows


def cmd_methods(args: argparse.Namespace) -> int:
    rows = method_rows()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        merge = "merges exactly" if row["mergeable"] else "not mergeable"
        print(f"{row['method']:<13} {row['paper']}  [{merge}]")
        print(f"{'':<13} count: {row['count']}")
        if row["options"]:
            print(f"{'':<13} options: " + ", ".join(f"{k}={v!r}" for k, v in row["options"].items()))
    return 0


def _version() -> str:
    from . import __version__

    return __version__


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, (VpetlError, CliError)) else f"{type(error).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vpetl`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (VpetlError, CliError) as error:
        message = _one_line(error)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as error:  # noqa: BLE001 - one line, not a traceback, unless debugging
        if os.environ.get("VPETL_DEBUG"):
            raise
        message = _one_line(error)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
