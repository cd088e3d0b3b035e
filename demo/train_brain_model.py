"""Trains the demo's brain-extraction model and writes it as an nnU-Net v2 trained-model folder.

    python demo/train_brain_model.py --data data/demo --output demo/brain_model [--iterations 3000] [--seed 0]

Training data: one template, nilearn's MNI152 2009a T1 (already skull-stripped, BSD-3), with its own brain mask
(T1 > 0, holes filled) as the label. Every training sample is a synthetic *head* built around that brain on the
GPU, in the manner of SynthStrip (Hoopes et al., NeuroImage 2022):
  - non-brain layers from the distance to the brain surface, each with a random, spatially varying thickness:
    CSF, the skull's outer tables and diploe, scalp muscle and fat; a face/neck column below the brain filled with
    random ellipsoids (eyes, muscle, fat, airways);
  - intensities drawn per layer, T1-like (dark CSF and bone, bright fat) in most samples and arbitrary in the rest,
    with the template's own brain texture under a random gamma and contrast;
  - spatial augmentation: random rotation (+-15 deg), per-axis scaling (0.85-1.15), translation (+-12 mm) and a
    smooth elastic field, resampled onto the model's 2 mm grid; random left-right flips (the one mirroring axis the
    model allows at inference);
  - intensity augmentation: multiplicative bias field, blur, low-resolution simulation, Gaussian noise, gamma,
    zero or noisy air, then nnU-Net's z-score normalization and zero padding at the borders.
The model never sees Colin27 (Debian's mricron-data), which is the held-out test volume: its `ch2bet > 0` mask is
the reference for the Dice reported by `make demo`.

Network and folder: nnU-Net's PlainConvUNet (5 stages, 8->128 features, 1.4 M parameters), 2 mm isotropic
spacing, patch (z, y, x) = (96, 112, 96), ZScoreNormalization, labels background/brain, mirroring on axis 2 (x,
left-right) only. The folder holds plans.json, dataset.json, fold_0/checkpoint_final.pth (float32 weights) and
training_log.json (command, seed, data checksums, loss curve, wall time, device).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trtseg import synthetic  # noqa: E402

MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
PATCH_ZYX = (96, 112, 96)
SPACING_MM = 2.0
FEATURES = (8, 16, 32, 64, 128)
DATASET_JSON = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "brain": 1}, "numTraining": 1,
                "file_ending": ".nii.gz", "name": "Dataset001_DemoBrainExtraction",
                "description": "trtseg demo: brain extraction on T1 MRI, trained on synthetic heads around MNI152 2009a",
                "licence": "BSD-3-Clause (training data: nilearn's MNI152 2009a template)"}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Template:
    """The MNI152 brain at 1 mm, (z, y, x), on ``device``: T1 texture (white matter ~ 1), brain mask, and the
    distance outside the brain in mm."""

    def __init__(self, data_dir: str, device: torch.device):
        img = nib.load(os.path.join(data_dir, MNI_T1))
        t1 = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)  # nibabel (x, y, z) -> (z, y, x)
        brain = ndimage.binary_fill_holes(t1 > 0)
        t1 = t1 / np.percentile(t1[brain], 90)
        outside_mm = ndimage.distance_transform_edt(~brain).astype(np.float32)
        # the head continues below the brain (face, neck): every voxel under the brain's footprint, plus a margin
        footprint = ndimage.binary_dilation(brain.any(axis=0), iterations=6)
        below = np.zeros_like(brain)
        lowest = np.argmax(brain.any(axis=(1, 2)))
        below[:lowest + 40] = footprint[None]
        below &= ~brain
        self.t1 = torch.from_numpy(t1).to(device)
        self.brain = torch.from_numpy(brain.astype(np.float32)).to(device)
        self.outside_mm = torch.from_numpy(outside_mm).to(device)
        self.below = torch.from_numpy(below.astype(np.float32)).to(device)
        self.shape = t1.shape
        self.device = device


def smooth_field(shape, ctrl: int, gen: torch.Generator, device) -> torch.Tensor:
    """A smooth random field in about [-1, 1] of ``shape`` (z, y, x), from a ``ctrl``^3 grid upsampled trilinearly."""
    g = torch.randn((1, 1, ctrl, ctrl, ctrl), generator=gen, device=device)
    return F.interpolate(g, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].clamp(-2.5, 2.5) / 2.5


def u(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, device=gen.device))


def render_head(tpl: Template, gen: torch.Generator) -> torch.Tensor:
    """One synthetic T1-like head at 1 mm (z, y, x), float32, air near 0 and white matter near 1."""
    dev = tpl.device
    shape = tpl.shape
    t1_like = u(gen, 0, 1) < 0.75
    d = tpl.outside_mm + 2.0 * smooth_field(shape, 6, gen, dev)
    csf_t = u(gen, 1.0, 4.0)
    table_t = u(gen, 1.0, 2.5)
    diploe_t = u(gen, 1.0, 4.0)
    muscle_t = u(gen, 1.0, 5.0)
    fat_t = u(gen, 2.0, 7.0)
    edges = np.cumsum([csf_t, table_t, diploe_t, table_t, muscle_t, fat_t])
    if t1_like:
        levels = [u(gen, 0.1, 0.35), u(gen, 0.0, 0.15), u(gen, 0.3, 0.9), u(gen, 0.0, 0.15), u(gen, 0.35, 0.65),
                  u(gen, 0.9, 1.5)]
    else:
        levels = [u(gen, 0.0, 1.5) for _ in range(6)]
    img = torch.zeros(shape, device=dev)
    lower = torch.zeros((), device=dev)
    for edge, level in zip(edges, levels):
        layer = (d > lower) & (d <= float(edge))
        img = torch.where(layer, torch.full_like(img, level), img)
        lower = torch.tensor(float(edge), device=dev)
    head_outer = float(edges[-1])
    # face and neck: soft tissue with random ellipsoids below the brain, clipped to a rough head outline
    below = (tpl.below > 0) & (d > head_outer * 0.5)
    tissue = torch.full_like(img, u(gen, 0.3, 0.7) if t1_like else u(gen, 0.0, 1.5))
    zz, yy, xx = torch.meshgrid(*[torch.arange(n, device=dev, dtype=torch.float32) for n in shape], indexing="ij")
    nz = torch.nonzero(below)
    if len(nz):
        for _ in range(int(u(gen, 6, 20))):
            c = nz[int(u(gen, 0, len(nz) - 1))].float()
            r = [u(gen, 4, 22) for _ in range(3)]
            blob = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 < 1
            level = [u(gen, 0.0, 0.2), u(gen, 0.35, 0.65), u(gen, 0.9, 1.5), u(gen, 0.6, 1.0)][int(u(gen, 0, 3.999))] \
                if t1_like else u(gen, 0.0, 1.5)
            tissue = torch.where(blob, torch.full_like(tissue, level), tissue)
    img = torch.where(below & (d > head_outer), tissue, img)
    # non-brain texture, then the template's brain under a random gamma and contrast
    img = img * (1 + 0.15 * smooth_field(shape, 24, gen, dev))
    brain_tex = tpl.t1.clamp(min=0) ** math.exp(u(gen, -0.4, 0.4))
    if not t1_like:
        brain_tex = u(gen, 0.3, 1.5) * brain_tex + u(gen, -0.3, 0.3)
    img = torch.where(tpl.brain > 0, brain_tex, img).clamp(min=0)
    return img


def sample(tpl: Template, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One training pair on the model's grid: image (1, z, y, x) z-scored, label (z, y, x) int64."""
    dev = tpl.device
    head = render_head(tpl, gen)
    sigma = u(gen, 0.0, 1.2)
    if sigma > 0.3:  # partial-volume blur
        k = torch.arange(-3, 4, device=dev, dtype=torch.float32)
        w = torch.exp(-0.5 * (k / sigma) ** 2)
        w = w / w.sum()
        x = head[None, None]
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = 7
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 3
            x = F.conv3d(F.pad(x, pad, mode="replicate"), w.view(shape))
        head = x[0, 0]
    # output grid: PATCH_ZYX voxels of SPACING_MM around the template's centre, under a random affine + elastic field
    size_mm = torch.tensor(tpl.shape, dtype=torch.float32, device=dev)
    angles = [math.radians(u(gen, -15, 15)) for _ in range(3)]
    rot = torch.eye(3, device=dev)
    for i, a in enumerate(angles):
        j, k = [ax for ax in range(3) if ax != i]
        r = torch.eye(3, device=dev)
        r[j, j], r[j, k], r[k, j], r[k, k] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        rot = rot @ r
    scale = torch.tensor([u(gen, 0.85, 1.15) for _ in range(3)], device=dev)
    shift_mm = torch.tensor([u(gen, -12, 12) for _ in range(3)], device=dev)
    axes = [torch.linspace(-(n - 1) / 2, (n - 1) / 2, n, device=dev) * SPACING_MM for n in PATCH_ZYX]
    grid_mm = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (z, y, x, 3) in mm, (z, y, x) order
    grid_mm = (grid_mm * scale) @ rot.T + shift_mm
    elastic = torch.stack([smooth_field(PATCH_ZYX, 5, gen, dev) for _ in range(3)], dim=-1) * u(gen, 0, 4.0)
    grid_mm = grid_mm + elastic
    norm = grid_mm / ((size_mm - 1) / 2)  # template centre -> 0, its faces -> +-1
    grid = norm.flip(-1)[None]  # grid_sample wants (x, y, z)
    img = F.grid_sample(head[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    lab = F.grid_sample(tpl.brain[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    lab = (lab > 0.5).long()
    # intensity: bias field, low resolution, gamma, air, noise
    img = img * torch.exp(u(gen, 0, 0.5) * smooth_field(PATCH_ZYX, 4, gen, dev))
    if u(gen, 0, 1) < 0.25:
        f = u(gen, 1.2, 2.0)
        small = [max(8, int(n / f)) for n in PATCH_ZYX]
        img = F.interpolate(F.interpolate(img[None, None], size=small, mode="trilinear"), size=PATCH_ZYX, mode="trilinear")[0, 0]
    img = img.clamp(min=0) ** math.exp(u(gen, -0.3, 0.3))
    if u(gen, 0, 1) < 0.5:
        air = torch.randn(PATCH_ZYX, generator=gen, device=dev).abs() * u(gen, 0.005, 0.05)
        img = torch.where(img > 0, img, air)
    img = img + torch.randn(PATCH_ZYX, generator=gen, device=dev) * u(gen, 0, 0.04) * (img > 0)
    if u(gen, 0, 1) < 0.5:
        img, lab = img.flip(2), lab.flip(2)
    # nnU-Net's ZScoreNormalization over the whole (cropped) image, then its zero padding at the borders
    img = (img - img.mean()) / img.std().clamp(min=1e-8)
    if u(gen, 0, 1) < 0.5:
        m = [int(u(gen, 0, 7)) for _ in range(6)]
        keep = torch.zeros_like(img, dtype=torch.bool)
        keep[m[0]:PATCH_ZYX[0] - m[1], m[2]:PATCH_ZYX[1] - m[3], m[4]:PATCH_ZYX[2] - m[5]] = True
        img = torch.where(keep, img, torch.zeros_like(img))
    return img[None], lab


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, target)
    p = logits.softmax(1)[:, 1]
    t = (target == 1).float()
    dice = (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    return ce + (1 - dice)


def plans() -> dict:
    p = synthetic.plans_dict(patch_size=PATCH_ZYX, spacing=(SPACING_MM,) * 3, features=FEATURES,
                             normalization=("ZScoreNormalization",))
    p["dataset_name"] = DATASET_JSON["name"]
    cfg = p["configurations"]["3d_fullres"]
    cfg["batch_size"] = 2
    cfg["median_image_size_in_voxels"] = [91, 109, 91]
    p["original_median_spacing_after_transp"] = [1.0, 1.0, 1.0]
    p["original_median_shape_after_transp"] = [189, 233, 197]
    p["foreground_intensity_properties_per_channel"] = {"0": {"max": 1.3, "mean": 0.75, "median": 0.78, "min": 0.0,
                                                              "percentile_00_5": 0.15, "percentile_99_5": 1.1,
                                                              "std": 0.2}}
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/demo", help="folder from scripts/demo_data.sh")
    ap.add_argument("--output", default="demo/brain_model")
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop early after this much training time (recorded in training_log.json)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preview", default=None, help="write a PNG of a few training samples here and stop")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    tpl = Template(args.data, dev)
    if args.preview:
        write_preview(tpl, gen, args.preview)
        return
    pl = plans()
    net = synthetic.build_network(pl, DATASET_JSON).to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.iterations, pct_start=0.05)
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda" else dict(device_type="cpu", enabled=False)
    log, t0, running = [], time.time(), []
    for it in range(1, args.iterations + 1):
        with torch.no_grad():
            pairs = [sample(tpl, gen) for _ in range(args.batch_size)]
        x = torch.stack([p[0] for p in pairs])
        y = torch.stack([p[1] for p in pairs])
        with torch.autocast(**amp):
            logits = net(x)
        loss = dice_ce_loss(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if it % 100 == 0 or it == args.iterations:
            log.append({"iteration": it, "loss": round(float(np.mean(running)), 4), "seconds": round(time.time() - t0, 1)})
            running = []
            print(log[-1], flush=True)
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            print(f"stopping early at iteration {it}: --max-seconds {args.max_seconds}", flush=True)
            break
    net.eval()
    synthetic.write_model_folder(args.output, pl, DATASET_JSON, {0: net.cpu().state_dict()}, mirror_axes=(2,))
    info = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "seed": args.seed, "iterations": args.iterations, "iterations_done": it, "batch_size": args.batch_size, "lr": args.lr,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "train_seconds": round(time.time() - t0, 1),
        "training_data": {MNI_T1: sha256(os.path.join(args.data, MNI_T1))},
        "parameters": sum(p.numel() for p in net.parameters()), "loss_curve": log,
    }
    with open(os.path.join(args.output, "training_log.json"), "w") as f:
        json.dump(info, f, indent=1)
    print("wrote", args.output)


def write_preview(tpl: Template, gen: torch.Generator, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(4, 3, figsize=(9, 12))
    for i in range(4):
        img, lab = sample(tpl, gen)
        img, lab = img[0].cpu().numpy(), lab.cpu().numpy()
        c = [n // 2 for n in img.shape]
        for j, (sl, ml) in enumerate([(img[c[0]], lab[c[0]]), (img[:, c[1]], lab[:, c[1]]), (img[:, :, c[2]], lab[:, :, c[2]])]):
            ax[i, j].imshow(sl, cmap="gray", origin="lower")
            ax[i, j].contour(ml, levels=[0.5], colors="r", linewidths=0.7, origin="lower")
            ax[i, j].axis("off")
    plt.tight_layout()
    plt.savefig(path, dpi=60)


if __name__ == "__main__":
    main()
