"""The vpetl workflow on a video backbone: torchvision's Video Swin (``swin3d_t``), offline.

This demonstrates the API, not accuracy. No pretrained video weights and no labelled video data
set can be had from the package registries, so:

* the backbone is ``torchvision.models.video.swin3d_t`` with **random weights** (``weights=None``;
  with internet access, ``swin3d_t(weights="KINETICS400_V1")`` gives the Kinetics-400 weights the
  paper starts from, and nothing else below changes);
* the clips are built from the two real photographs bundled with scikit-learn (``china.jpg``,
  ``flower.jpg``) with **synthetic motion**: a crop window pans across the photograph at a random
  speed, and the label is the pan direction (left, right, up, down). The labels are true by
  construction; the task says nothing about real video understanding.

The script injects a method (BAPAT by default: Adapter-64 + PATT on K,V + head), prints the
trainable-parameter summary, trains a few steps with the same recipe shape as the image example
(AdamW, linear warm-up then cosine decay), saves the delta, loads it into a freshly built backbone and checks that
the outputs match.

    python examples/video_swin.py                 # under a minute on 2 CPU cores
    python examples/video_swin.py --smoke         # seconds (CI)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vpetl

DIRECTIONS = ["left", "right", "up", "down"]
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def real_photos() -> list[torch.Tensor]:
    """scikit-learn's two bundled photographs as ``[3, H, W]`` floats in [0, 1]."""
    from sklearn.datasets import load_sample_images

    return [torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255) for im in load_sample_images().images]


def panning_clips(photos: list[torch.Tensor], n: int, frames: int, size: int, seed: int):
    """``n`` clips ``[3, frames, size, size]`` panning across real photos; label = pan direction.

    A square window (a random fraction of the photo's short side) starts at a random position and
    moves a random 2-6 % of the photo's short side per frame in one of four directions; each frame
    is that window resized to ``size``. Normalised with the Kinetics-400 mean and std.
    """
    gen = torch.Generator().manual_seed(seed)
    clips, labels = [], []
    mean = torch.tensor(KINETICS_MEAN)[:, None, None, None]
    std = torch.tensor(KINETICS_STD)[:, None, None, None]
    for i in range(n):
        photo = photos[i % len(photos)]
        _, height, width = photo.shape
        short = min(height, width)
        label = int(torch.randint(len(DIRECTIONS), (1,), generator=gen))
        window = int(short * (0.35 + 0.25 * torch.rand(1, generator=gen).item()))
        step = short * (0.02 + 0.04 * torch.rand(1, generator=gen).item())
        step = min(step, (short - window - 1) / max(1, frames - 1))  # the whole pan fits in the photo
        travel = step * (frames - 1)
        dx, dy = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[DIRECTIONS[label]]
        # a start position from which the whole pan stays inside the photo
        x_lo, x_hi = (travel, width - window) if dx < 0 else (0, width - window - (travel if dx > 0 else 0))
        y_lo, y_hi = (travel, height - window) if dy < 0 else (0, height - window - (travel if dy > 0 else 0))
        x0 = x_lo + (x_hi - x_lo) * torch.rand(1, generator=gen).item()
        y0 = y_lo + (y_hi - y_lo) * torch.rand(1, generator=gen).item()
        frames_list = []
        for t in range(frames):
            x = min(max(0, int(round(x0 + dx * t))), width - window)
            y = min(max(0, int(round(y0 + dy * t))), height - window)
            crop = photo[:, y:y + window, x:x + window]
            frames_list.append(F.interpolate(crop[None], size=(size, size), mode="bilinear",
                                             align_corners=False, antialias=True)[0])
        clips.append((torch.stack(frames_list, dim=1) - mean) / std)
        labels.append(label)
    return torch.stack(clips), torch.tensor(labels)


def build_backbone(num_classes: int, seed: int):
    """swin3d_t with fixed random weights, and a function that builds a fresh copy of that base."""
    from torchvision.models.video import swin3d_t

    torch.manual_seed(seed)
    base_state = swin3d_t(weights=None, num_classes=num_classes).state_dict()

    def fresh():
        model = swin3d_t(weights=None, num_classes=num_classes)
        model.load_state_dict(base_state)  # stands in for the pretrained checkpoint
        return model

    return fresh, base_state


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="bapat", choices=["linear", "lora", "adapter", "patt", "bapat"],
                        help="vpetl method (default bapat)")
    parser.add_argument("--d-bottle", type=int, help="PATT/adapter width or LoRA rank (default: 32; smoke 8)")
    parser.add_argument("--steps", type=int, help="training steps (default 24; smoke 2)")
    parser.add_argument("--batch-size", type=int, help="clips per step (default 4; smoke 2)")
    parser.add_argument("--frames", type=int, help="frames per clip (default 8; smoke 4)")
    parser.add_argument("--size", type=int, help="frame size in px (default 64; smoke 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clips and the random backbone")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's choice; 1 helps on a busy machine)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings for a seconds-long check")
    parser.add_argument("--delta", type=Path, help="where to write the delta (default: a temporary file)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    small = args.smoke
    d_bottle = args.d_bottle or (8 if small else 32)
    steps = args.steps or (2 if small else 24)
    batch = args.batch_size or (2 if small else 4)
    frames = args.frames or (4 if small else 8)
    size = args.size or (32 if small else 64)
    width = None if args.method == "linear" else d_bottle

    print("Video Swin (torchvision swin3d_t) with RANDOM weights on clips panned across two real photographs:\n"
          "this shows the API (inject, train, save/load the delta), not accuracy.")
    photos = real_photos()
    train_x, train_y = panning_clips(photos, steps * batch, frames, size, args.seed)
    test_x, test_y = panning_clips(photos, 2 * batch, frames, size, args.seed + 1)

    fresh, base_state = build_backbone(len(DIRECTIONS), args.seed)
    model = fresh()
    torch.manual_seed(args.seed + 1)
    vpetl.inject(model, args.method, d_bottle=width, example_input=test_x[:1])
    print(vpetl.summary(model))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warmup = max(1, steps // 5)
    def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    from tqdm.auto import tqdm

    model.train()
    losses = []
    start = time.perf_counter()
    with tqdm(range(steps), desc=f"{args.method} on swin3d_t", unit="step") as bar:
        for step in bar:
            x, y = train_x[step * batch:(step + 1) * batch], train_y[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        logits = model(test_x)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.delta or Path(tmp) / f"swin3d_t_{args.method}.safetensors"
        vpetl.save_delta(model, path)
        size_mb = path.stat().st_size / 1e6
        reloaded = vpetl.load_delta(fresh(), path).eval()
        with torch.no_grad():
            logits_reloaded = reloaded(test_x)
    diff = (logits - logits_reloaded).abs().max().item()
    same = torch.equal(logits.argmax(1), logits_reloaded.argmax(1)) and diff < 1e-5
    base_mb = sum(v.numel() * v.element_size() for v in base_state.values()) / 1e6
    print(f"trained {steps} steps ({steps * batch} clips of {frames}x{size}x{size}) in {train_s:.1f}s; "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (mean of first/last third "
          f"{np.mean(losses[:max(1, steps // 3)]):.3f} -> {np.mean(losses[-max(1, steps // 3):]):.3f}; "
          f"chance level ln 4 = {math.log(len(DIRECTIONS)):.3f})")
    print(f"delta {size_mb:.2f} MB vs full checkpoint {base_mb:.1f} MB; reloaded into a fresh swin3d_t: "
          f"max abs logit difference {diff:.1e} -> {'identical predictions' if same else 'MISMATCH'}")
    print("Not an accuracy result: random backbone weights, a handful of synthetic-motion clips.")
    if not same:
        raise SystemExit(1)
    return {"losses": losses, "reload_max_abs_diff": diff, "delta_mb": size_mb, "train_s": train_s}


if __name__ == "__main__":
    main()
