"""Save and load the trained part of an injected model: a small ``.safetensors`` file.

A delta file holds only the tensors ``inject`` made trainable (``get_record(model).delta_names``)
and, in the safetensors header's string metadata, everything needed to rebuild the injection on
a fresh base model and to check that it fits:

=================  ===============================================================================
key                value
=================  ===============================================================================
``format``         ``"vpetl.delta"``
``format_version`` ``"2"`` (``"1"``, written by vpetl 0.1.0, is still read)
``vpetl_version``  the vpetl version that wrote the file
``config``         the ``InjectConfig`` as JSON (``InjectConfig.to_dict``)
``base_shapes``    JSON ``{name: [shape]}`` of every base parameter (no ``vpetl_`` in the name,
                   head included): the architecture fingerprint
``base_checksum``  JSON ``{name: [mean, ramp mean, mean |x|]}`` of 64 evenly spaced values of
                   every frozen base tensor, compared with a tolerance (dtype casts still match)
``model_class``    the model's class name (informational, used in messages)
``tensor_count``   the number of tensors in the file
=================  ===============================================================================

The file is plain safetensors (never pickle): any safetensors reader opens it. Saving is atomic:
the bytes go to a temporary file in the target directory, which is fsynced and then renamed onto
the target, so a failure leaves neither a half-written file nor a damaged previous one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import struct
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .config import InjectConfig
from .errors import (
    BaseWeightsWarning,
    ConfigError,
    DeltaFileError,
    DeltaMismatchError,
    InjectionError,
    format_names,
)
from .inject import inject
from .options import Kernel
from .record import get_record, set_record
from .registry import BRANCH_MARKER

FORMAT_NAME = "vpetl.delta"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # "1": vpetl 0.1.0, one config field per method
CHECKSUM_SAMPLES = 64
METADATA_KEYS = (
    "format", "format_version", "vpetl_version", "config", "base_shapes", "base_checksum", "model_class",
    "tensor_count",
)
_MAX_HEADER_BYTES = 100_000_000  # the safetensors limit

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- public API


def delta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors ``inject`` chose, by state-dict name (detached, on their device)."""
    record = get_record(model)
    if record is None:
        raise InjectionError(
            f"this {type(model).__name__} is not injected, so it has no delta; call vpetl.inject(model, ...) first."
        )
    if record.tasks is not None:
        raise InjectionError(
            f"this model carries the tasks {list(record.tasks.tasks)}; save one with "
            "vpetl.save_delta(model, path, task='name')."
        )
    params = dict(model.named_parameters())
    missing = [n for n in record.delta_names if n not in params]
    if missing:
        raise InjectionError(
            f"the injection record names parameters the model no longer has: {format_names(missing)}. "
            "Was the model changed after vpetl.inject?"
        )
    return {name: params[name].detach() for name in record.delta_names}


SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def save_delta(model: nn.Module, path: PathLike, *, dtype: torch.dtype | None = None, task: str | None = None) -> Path:
    """Write the delta of an injected ``model`` to ``path`` (one safetensors file); return the path.

    Only the trainable tensors are stored, on CPU and contiguous, with the injection config and a
    fingerprint of the base in the metadata (see the module docstring). The write is atomic.
    ``dtype`` (e.g. ``torch.bfloat16``) stores the floating-point tensors in that dtype (half
    the file); None keeps each tensor's own. ``load_delta`` converts every tensor to the dtype
    of the model parameter it lands in. ``task`` (a model carrying tasks, :mod:`vpetl.multitask`)
    writes that task's delta: the file it was loaded as, with its current values.
    """
    from . import __version__  # lazy: vpetl/__init__ imports this module

    if dtype is not None and dtype not in SAVE_DTYPES:
        raise DeltaFileError(
            f"save_delta dtype must be None or one of {', '.join(str(d) for d in SAVE_DTYPES)}; got {dtype!r}."
        )
    if task is not None:
        chosen = _task(model, task)
        tensors = _saveable({name: param.detach() for name, param in chosen.params.items()})
        fingerprint = {k: chosen.metadata[k] for k in ("base_shapes", "base_checksum", "model_class")}
        config = chosen.config
    else:
        tensors = _saveable(delta_state_dict(model))
        config = get_record(model).config
        fingerprint = {
            "base_shapes": json.dumps(base_shapes(model), sort_keys=True, separators=(",", ":")),
            "base_checksum": json.dumps(base_checksum(model, exclude=set(tensors)), separators=(",", ":")),
            "model_class": type(model).__name__,
        }
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vpetl_version": __version__,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        **fingerprint,
        "tensor_count": str(len(tensors)),
    }
    target = Path(os.fspath(path))
    _atomic_write(target, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))
    return target


def load_delta(model: nn.Module, path: PathLike, *, strict: bool = True, task: str | None = None) -> nn.Module:
    """Load a delta file into ``model`` and return it.

    A plain (not injected) model is first checked against the delta's base fingerprint, then
    injected with the stored config; an injected model must carry the same config. The tensors
    are then copied in (onto the model's device and dtype). If the base weights differ from the
    ones the delta was trained on, a ``BaseWeightsWarning`` is issued and the values are loaded.

    ``strict=False`` loads what fits: differences of architecture, and delta tensors the model
    lacks or holds with another shape (e.g. a head for another number of classes) are skipped
    with a warning instead of raising. A different injection config always raises.

    ``task="name"`` adds the delta as a named task beside the ones already loaded (a plain model
    first): see :mod:`vpetl.multitask`; its head may have another size than the base's.

    Raises ``DeltaFileError`` for an unreadable file and ``DeltaMismatchError`` when the delta
    does not fit; on either, a model that was not injected is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_delta expects a torch.nn.Module; got {type(model).__name__}.")
    path = Path(os.fspath(path))
    metadata, tensor_names = read_header(path)
    config = _stored_config(path, metadata)
    if task is not None:
        return _load_task(model, path, task, config, metadata)
    stored_shapes = _json_field(path, metadata, "base_shapes", dict)
    origin = f"the delta {path} (saved from {metadata.get('model_class', 'a model')})"

    arch_problems = _compare_base(stored_shapes, base_shapes(model))
    if arch_problems:
        message = f"{origin} does not fit this {type(model).__name__}'s architecture: {arch_problems}"
        if strict:
            raise DeltaMismatchError(
                message + ". Build the model the delta was trained with (same depth, width and head), "
                "or pass strict=False to load only what fits."
            )
        warnings.warn(message + "; loading what fits (strict=False).", stacklevel=2)

    record = get_record(model)
    if record is not None and _comparable(record.config) != _comparable(config):
        raise DeltaMismatchError(
            f"{origin} was saved with injection config\n  {_show(config)}\nbut the model is injected with\n  "
            f"{_show(record.config)}.\nCall vpetl.unload(model) and load the delta into the plain model "
            "(load_delta injects it with the stored config)."
        )
    changed = different_weights(_json_field(path, metadata, "base_checksum", dict), base_checksum(model, set(tensor_names)))

    tensors = _read_tensors(path)
    injected_here = record is None
    if injected_here:
        inject(model, config)
        record = get_record(model)
    try:
        _copy_in(model, record.delta_names, tensors, origin, strict)
    except BaseException:
        if injected_here:  # leave the model as it came
            record.undo(model)
            set_record(model, None)
        raise
    if changed and not arch_problems:
        warnings.warn(
            f"{origin} was trained on other base weights than this model's ({len(changed)} frozen tensors "
            f"differ, e.g. {format_names(changed, 3)}); the delta is loaded, but outputs will differ from "
            "the trained model. Load the same pretrained checkpoint the delta was trained on.",
            BaseWeightsWarning,
            stacklevel=2,
        )
    return model


# --------------------------------------------------------------------------- fingerprints


def base_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{name: shape}`` of every base parameter (every parameter not added by vpetl)."""
    return {n: list(p.shape) for n, p in model.named_parameters() if BRANCH_MARKER not in n}


def base_checksum(model: nn.Module, exclude: set[str] = frozenset()) -> dict[str, list[float]]:
    """A cheap fingerprint of the frozen base weights' values: per parameter not in ``exclude``
    (the delta's own tensors), three statistics of ``CHECKSUM_SAMPLES`` evenly spaced values
    (first and last included): their mean, their ramp-weighted mean and their mean magnitude.

    Compared with a tolerance (:func:`different_weights`), so the same weights cast to another
    float dtype (``.half()``, ``.bfloat16()``, ``.double()``) still match, while other weights
    (another checkpoint, a fresh init) differ by far more. Reads at most 64 values per tensor:
    milliseconds even for ViT-B.
    """
    out: dict[str, list[float]] = {}
    for name, param in sorted(model.named_parameters()):
        if BRANCH_MARKER in name or name in exclude:
            continue
        flat = param.detach().reshape(-1)
        count = min(flat.numel(), CHECKSUM_SAMPLES)
        if count == 0:
            out[name] = [0.0, 0.0, 0.0]
            continue
        index = torch.linspace(0, flat.numel() - 1, count, dtype=torch.float64).round().long()
        sample = flat[index.to(flat.device)].to("cpu", torch.float64)
        ramp = torch.linspace(-1, 1, count, dtype=torch.float64)
        out[name] = [float(sample.mean()), float((sample * ramp).mean()), float(sample.abs().mean())]
    return out


def different_weights(stored: dict[str, list[float]], current: dict[str, list[float]], rtol: float = 1e-2) -> list[str]:
    """Names whose checksums differ by more than ``rtol`` of the tensor's mean magnitude
    (a half-precision cast moves them by about 1e-3 of it)."""
    differ = []
    for name in sorted(set(stored) & set(current)):
        a, b = stored[name], current[name]
        scale = max(abs(a[2]), abs(b[2]), 1e-12)
        if any(abs(x - y) > rtol * scale for x, y in zip(a, b)):
            differ.append(name)
    return differ


def _compare_base(stored: dict[str, Any], current: dict[str, list[int]]) -> str:
    """A description of every name / shape difference, or "" if the architectures match."""
    parts = []
    missing = set(stored) - set(current)
    unexpected = set(current) - set(stored)
    if missing:
        parts.append(f"parameters the model lacks: {format_names(missing)}")
    if unexpected:
        parts.append(f"parameters the delta's base lacks: {format_names(unexpected)}")
    shapes = _shape_diffs(stored, current)
    if shapes:
        parts.append(f"shapes differ: {shapes}")
    return "; ".join(parts)


def _shape_diffs(delta: dict[str, Any], model: dict[str, Any], limit: int = 12) -> str:
    """"name: delta has (..), model has (..)" for every common name whose shapes differ, sorted."""
    diffs = sorted(
        f"{n}: delta has {_shape(delta[n])}, model has {_shape(model[n])}"
        for n in set(delta) & set(model)
        if _shape(delta[n]) != _shape(model[n])
    )
    more = f"; ... ({len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


# --------------------------------------------------------------------------- reading


def read_header(path: Path) -> tuple[dict[str, str], list[str]]:
    """Validate ``path`` as a vpetl delta from its header alone; return (metadata, tensor names).

    Raises ``DeltaFileError`` naming the path and the reason.
    """
    if not path.exists():
        raise _file_error(path, "file does not exist")
    if path.is_dir():
        raise _file_error(path, "is a directory, not a delta file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _file_error(path, "file is empty")
            if size < 8:
                raise _file_error(path, f"not a safetensors file (only {size} bytes, less than its 8-byte header)")
            (header_len,) = struct.unpack("<Q", f.read(8))
            first = f.read(1)
            if header_len < 2 or header_len > _MAX_HEADER_BYTES or first != b"{":
                raise _file_error(path, "not a safetensors file (header is unreadable)")
            if 8 + header_len > size:
                raise _file_error(path, f"truncated: header says {8 + header_len} bytes, file has {size}")
            raw = first + f.read(header_len - 1)
    except OSError as e:
        raise _file_error(path, f"cannot be read ({e.strerror or e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
        raise _file_error(path, "not a safetensors file (header is unreadable)") from None
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise _file_error(path, f"truncated: header says {expected} bytes, file has {size}")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise _file_error(path, "not a vpetl delta (no vpetl metadata); it is a safetensors file of other tensors")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise _file_error(
            path, f"unsupported delta format version {version!r} (this vpetl reads versions "
            f"{', '.join(READABLE_VERSIONS)}); "
            "upgrade vpetl to read it"
        )
    absent = [k for k in METADATA_KEYS if k not in metadata and k != "model_class"]
    if absent:
        raise _file_error(path, f"corrupt vpetl metadata: missing {format_names(absent)}")
    names = [k for k in header if k != "__metadata__"]
    if metadata["tensor_count"] != str(len(names)):
        raise _file_error(path, f"corrupt: metadata says {metadata['tensor_count']} tensors, file has {len(names)}")
    return metadata, names


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for bad buffers
        raise _file_error(path, f"tensor data is unreadable ({e})") from e


def _stored_config(path: Path, metadata: dict[str, str]) -> InjectConfig:
    data = _json_field(path, metadata, "config", dict)
    try:
        return InjectConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise _file_error(path, f"the stored injection config cannot be used: {e}") from e


def _json_field(path: Path, metadata: dict[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(metadata[key])
    except (KeyError, ValueError):
        raise _file_error(path, f"corrupt vpetl metadata: {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise _file_error(path, f"corrupt vpetl metadata: {key!r} is not a JSON {kind.__name__}")
    return value


# --------------------------------------------------------------------------- loading values


def _copy_in(
    model: nn.Module, delta_names: tuple[str, ...], tensors: dict[str, torch.Tensor], origin: str, strict: bool
) -> None:
    """Check the delta's keys and shapes against ``delta_names``, then copy the values in."""
    params = dict(model.named_parameters())
    missing = set(delta_names) - set(tensors)
    unexpected = set(tensors) - set(delta_names)
    shape_diffs = _shape_diffs(
        {n: t.shape for n, t in tensors.items()}, {n: params[n].shape for n in delta_names}
    )
    problems = []
    if missing:
        problems.append(f"tensors the delta lacks: {format_names(missing)}")
    if unexpected:
        problems.append(f"tensors the model does not train: {format_names(unexpected)}")
    if shape_diffs:
        problems.append(f"shapes differ: {shape_diffs}")
    if problems:
        message = f"{origin} does not match the model's trainable parameters: {'; '.join(problems)}"
        if strict:
            raise DeltaMismatchError(message + ".")
        warnings.warn(message + "; those are skipped (strict=False).", stacklevel=3)
    with torch.no_grad():
        for name in delta_names:
            value = tensors.get(name)
            if value is not None and value.shape == params[name].shape:
                params[name].copy_(value)


# --------------------------------------------------------------------------- writing


def _saveable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = t
    return out


def _atomic_write(target: Path, write) -> None:
    """Call ``write(tmp_path)`` on a fresh file beside ``target``, fsync it, rename it onto ``target``.

    On any error the temporary file is removed and an existing ``target`` is untouched.
    """
    if target.is_dir():
        raise _file_error(target, "is a directory; pass a file path such as " f"{target / 'delta.safetensors'}")
    directory = target.parent
    if not directory.is_dir():
        reason = "does not exist" if not directory.exists() else "is not a directory"
        raise _file_error(target, f"cannot save: the directory {directory} {reason}; create it first")
    tmp = _create_unique(directory, target.name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):  # disk full, permissions changed...: the old file is intact
            raise _file_error(
                target, f"cannot save: writing failed ({error.strerror or error}); the previous file, "
                "if any, is unchanged"
            ) from error
        raise
    _fsync_directory(directory)


def _create_unique(directory: Path, name: str) -> Path:
    """Create an empty file with a unique name (default permissions, honouring the umask)."""
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise _file_error(
                directory / name,
                f"cannot save: cannot create a file in {directory} ({e.strerror or e}); choose a writable location",
            ) from e
        os.close(fd)
        return tmp
    raise _file_error(directory / name, "cannot save: no unique temporary file name found")


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); best effort elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- helpers


def _file_error(path: Path, reason: str) -> DeltaFileError:
    return DeltaFileError(f"{path}: {reason}.")


def _shape(shape: Any) -> str:
    try:
        return str(tuple(int(s) for s in shape))
    except (TypeError, ValueError):
        return repr(shape)  # a corrupt fingerprint entry: shown as is, never equal to a real shape


def _comparable(config: InjectConfig) -> InjectConfig:
    """The config without its kernel choice: the kernel changes speed, not the parameters."""
    return dataclasses.replace(config, kernel=Kernel.AUTO)


def _show(config: InjectConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------- tasks


def _task(model: nn.Module, name: str):
    record = get_record(model)
    taskset = record.tasks if record is not None else None
    if taskset is None or name not in taskset.tasks:
        known = list(taskset.tasks) if taskset is not None else []
        raise InjectionError(f"this model has no task {name!r}; its tasks: {known} (vpetl.tasks(model)).")
    return taskset.tasks[name]


def _load_task(model: nn.Module, path: Path, name: str, config: InjectConfig, metadata: dict[str, str]) -> nn.Module:
    """``load_delta(..., task=name)``: add the delta as a named task (see :mod:`vpetl.multitask`)."""
    from .heads import find_head_paths
    from .multitask import TaskSet, check_routable, extract_task, wire_tasks

    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(
            f"task must be a non-empty name without dots (it becomes part of parameter names); got {name!r}."
        )
    record = get_record(model)
    if record is not None and record.tasks is None:
        raise InjectionError(
            f"this model is injected with method {record.config.method!r}, not loaded as tasks; call "
            "vpetl.unload(model) first, then load every delta with task='name'."
        )
    taskset = record.tasks if record is not None else TaskSet()
    if name in taskset.tasks:
        raise InjectionError(f"task {name!r} is already loaded; this model's tasks: {list(taskset.tasks)}. "
                             "Pick another name.")
    origin = f"the delta {path} (saved from {metadata.get('model_class', 'a model')})"
    check_routable(config, origin)
    if record is not None:
        record.undo(model)  # the plain base again; the loaded tasks keep their modules
        set_record(model, None)
    changed: list[str] = []
    try:
        heads = tuple(p + "." for p in find_head_paths(model))
        stored = {k: v for k, v in _json_field(path, metadata, "base_shapes", dict).items() if not k.startswith(heads)}
        current = {k: v for k, v in base_shapes(model).items() if not k.startswith(heads)}
        problems = _compare_base(stored, current)
        if problems:
            raise DeltaMismatchError(
                f"{origin} does not fit this {type(model).__name__}'s architecture (the heads aside): {problems}. "
                "Every task must share the same base architecture."
            )
        tensors = _read_tensors(path)
        changed = different_weights(_json_field(path, metadata, "base_checksum", dict),
                                    base_checksum(model, set(tensors)))
        taskset.tasks[name] = extract_task(model, name, config, tensors, dict(metadata))
    finally:
        if taskset.tasks:
            set_record(model, wire_tasks(model, taskset))
    if changed:
        warnings.warn(
            f"{origin} was trained on other base weights than this model's ({len(changed)} frozen tensors differ, "
            f"e.g. {format_names(changed, 3)}); task {name!r} is loaded, but its outputs will differ from the "
            "trained model.",
            BaseWeightsWarning,
            stacklevel=3,
        )
    return model
