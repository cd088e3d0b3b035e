"""Quality control after write: pictures of each case's mask over its image, an HTML page, and Dice.

For every case of an input folder with a mask in the output folder, ``qc_folder`` writes OUTPUT/qc/CASE.png: three
orthogonal slices (sagittal, coronal, axial) through the mask's centre of mass, after reorienting both volumes to
RAS with nibabel (so any stored axis order looks upright; neurological convention, the patient's right on the
right), with the mask's outline
in red and, where a reference mask is given, the reference's outline in green. OUTPUT/qc/index.html lists the
cases with their pictures, status and stage timings from OUTPUT/run_report.json (when there is one) and their
Dice against the reference. Labels > 0 count as foreground for outlines and Dice.

matplotlib draws the pictures; it is imported here only, so the rest of trtseg does not need it.
"""
from __future__ import annotations

import html
import io
import json
import os
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np

from trtseg import storage
from trtseg.dataset import list_cases


@dataclass
class CaseQC:
    case_id: str
    status: str
    picture: str | None = None
    dice: float | None = None
    seconds: dict = field(default_factory=dict)
    error: str | None = None


def load_ras(files: list[str], storage_options: storage.StorageOptions | None = None) -> tuple[np.ndarray, tuple]:
    """A case's first channel, or a mask, read as trtseg reads inputs (NIfTI, NRRD/MetaImage, a DICOM series), as a
    float32 (x, y, z) array reoriented to RAS (voxel axes only, no resampling), and its voxel sizes (x, y, z) in mm.
    Image and mask go through the same reader, so their pictures line up whatever the format."""
    from trtseg.read import read_case

    img = read_case(list(files), storage_options=storage_options)
    header = img.header
    affine = header.get_best_affine() if isinstance(header, nib.Nifti1Header) else \
        np.diag([-1.0, -1.0, 1.0, 1.0]) @ header.affine()  # SimpleITK's LPS geometry turned to RAS
    data = np.asarray(img.data[0], dtype=np.float32).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    ras = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(ras.dataobj, dtype=np.float32), tuple(float(z) for z in ras.header.get_zooms()[:3])


def dice(mask: np.ndarray, reference: np.ndarray) -> float:
    """Dice of the foregrounds (labels > 0) of two arrays of one shape; 1.0 when both are empty."""
    a, b = mask > 0, reference > 0
    if a.shape != b.shape:
        raise ValueError(f"mask shape {a.shape} differs from the reference's {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def overlay_png(image_xyz: np.ndarray, mask_xyz: np.ndarray, reference_xyz: np.ndarray | None = None,
                title: str = "", voxel_mm: tuple = (1.0, 1.0, 1.0)) -> bytes:
    """PNG bytes: three orthogonal slices of a RAS (x, y, z) image through the mask's centre of mass, drawn with
    their true aspect (voxel_mm: x, y, z), with the mask outlined in red and the reference (if any) in green."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("trtseg qc draws with matplotlib: pip install 'trtseg[demo]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fg = mask_xyz > 0
    centre = [int(round(c)) for c in np.argwhere(fg).mean(axis=0)] if fg.any() else [s // 2 for s in fg.shape]
    lo, hi = np.percentile(image_xyz, [0.5, 99.5])
    vx, vy, vz = voxel_mm
    views = [("sagittal", lambda v: v[centre[0], :, :], vz / vy), ("coronal", lambda v: v[:, centre[1], :], vz / vx),
             ("axial", lambda v: v[:, :, centre[2]], vy / vx)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for ax, (name, cut, aspect) in zip(axes, views):
        ax.imshow(cut(image_xyz).T, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest",
                  aspect=aspect)
        if reference_xyz is not None and (reference_xyz > 0).any():
            ax.contour(cut(reference_xyz > 0).T.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        if fg.any():
            ax.contour(cut(fg).T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(name, color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, facecolor="black")
    plt.close(fig)
    return buf.getvalue()


def qc_folder(input_url: str, output_url: str, reference_url: str | None = None,
              storage_options: storage.StorageOptions | None = None) -> list[CaseQC]:
    """Pictures (OUTPUT/qc/CASE.png) and OUTPUT/qc/index.html for the cases of ``input_url``.

    reference_url: a folder of reference masks named CASE.nii.gz (optional, per case)
    Returns one CaseQC per case: status from the run report when there is one ("ok" when only the mask exists,
    "missing" when neither does), the picture's URL and the Dice against the reference.
    """
    report = _run_report(output_url, storage_options)
    by_id = {c["case_id"]: c for c in report.get("cases", [])}
    results = []
    for case in list_cases(input_url, storage_options=storage_options):
        entry = by_id.get(case.case_id, {})
        ending = ".nii.gz" if case.ending == ".dcm" else case.ending  # a DICOM series' NIfTI mask
        mask_url = storage.join(output_url, f"{case.case_id}{ending}")
        qc = CaseQC(case.case_id, entry.get("status", "ok"), seconds=entry.get("seconds") or {},
                    error=entry.get("error"))
        if not storage.exists(mask_url, storage_options):
            qc.status = entry.get("status", "missing") if entry.get("status") != "ok" else "missing"
            results.append(qc)
            continue
        try:
            image, voxel_mm = load_ras(list(case.files), storage_options)
            mask, _ = load_ras([mask_url], storage_options)
            ref_url = storage.join(reference_url, f"{case.case_id}.nii.gz") if reference_url else None
            has_ref = ref_url is not None and storage.exists(ref_url, storage_options)
            reference = load_ras([ref_url], storage_options)[0] if has_ref else None  # type: ignore[list-item]
            if reference is not None:
                qc.dice = round(dice(mask, reference), 4)
            title = case.case_id + (f"   Dice {qc.dice:.3f} vs reference (green)" if qc.dice is not None else "")
            png = storage.join(output_url, "qc", f"{case.case_id}.png")
            storage.write_bytes_atomic(png, overlay_png(image, mask, reference, title, voxel_mm), storage_options)
            qc.picture = png
        except Exception as e:  # a picture that cannot be drawn marks that case, never the others
            qc.status, qc.error = "qc failed", f"{case.case_id}: {type(e).__name__}: {e}"
        results.append(qc)
    storage.write_bytes_atomic(storage.join(output_url, "qc", "index.html"),
                               render_html(results, report).encode(), storage_options)
    return results


def _run_report(output_url: str, storage_options) -> dict:
    url = storage.join(output_url, "run_report.json")
    return json.loads(storage.read_bytes(url, storage_options)) if storage.exists(url, storage_options) else {}


def render_html(results: list[CaseQC], report: dict) -> str:
    """One self-contained page: a row per case with status, Dice, stage seconds and its picture."""
    stages = ["read", "preprocess", "infer", "export", "write"]
    rows = []
    for r in results:
        pic = f'<img src="{html.escape(os.path.basename(r.picture))}" width="720">' if r.picture else ""
        secs = "".join(f"<td>{r.seconds[s]:.2f}</td>" if s in r.seconds else "<td></td>" for s in stages)
        dice_cell = f"{r.dice:.4f}" if r.dice is not None else ""
        err = f'<div class="err">{html.escape(r.error)}</div>' if r.error else ""
        rows.append(f'<tr class="{html.escape(r.status.replace(" ", "-"))}"><td>{html.escape(r.case_id)}</td>'
                    f"<td>{html.escape(r.status)}{err}</td><td>{dice_cell}</td>{secs}<td>{pic}</td></tr>")
    summary = report.get("summary", {})
    engine = report.get("engine", {})
    head = (f"<p>{summary.get('ok', '?')} ok, {summary.get('failed', '?')} failed of {summary.get('total', len(results))}"
            f" cases in {summary.get('wall_seconds', '?')} s; engine {html.escape(json.dumps(engine))}</p>") if report else ""
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>trtseg QC</title><style>"
            "body{font-family:sans-serif} td,th{padding:4px 8px;border-bottom:1px solid #ccc;vertical-align:top}"
            ".failed,.missing,.qc-failed{background:#fdd} .err{color:#a00;font-size:smaller}</style></head><body>"
            "<h1>trtseg QC</h1>" + head + "<p>Red: the mask. Green: the reference, where there is one.</p>"
            "<table><tr><th>case</th><th>status</th><th>Dice</th>" + "".join(f"<th>{s} s</th>" for s in stages) +
            "<th>picture</th></tr>" + "".join(rows) + "</table></body></html>")
