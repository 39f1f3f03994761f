"""Reports of an evaluation: per-image CSV, markdown summary (mean ± std, delta vs bicubic), figure."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsr.eval.protocol import EvalResult, Sample

CSV_FIELDS = ("image", "method", "kind", "height", "width", "channels", "psnr", "ssim", "lpips", "seconds",
              "d_psnr_vs_bicubic", "d_ssim_vs_bicubic", "vessel_psnr", "d_vessel_psnr_vs_bicubic")
REFERENCE = "bicubic"


def _paired_deltas(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with per-image deltas vs the bicubic row of the same image added."""
    ref = {r["image"]: r for r in records if r["method"] == REFERENCE}
    out = []
    for r in records:
        r = dict(r)
        b = ref.get(r["image"])
        r["d_psnr_vs_bicubic"] = _delta(r["psnr"], b["psnr"]) if b else float("nan")
        r["d_ssim_vs_bicubic"] = _delta(r["ssim"], b["ssim"]) if b else float("nan")
        if "vessel_psnr" in r:
            bv = b.get("vessel_psnr", float("nan")) if b else float("nan")
            r["d_vessel_psnr_vs_bicubic"] = _delta(r["vessel_psnr"], bv)
        out.append(r)
    return out


def _delta(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b) and a == b:
        return 0.0
    return a - b


def write_csv(result: EvalResult | Sequence[dict[str, Any]], path: str | Path) -> Path:
    records = result.records if isinstance(result, EvalResult) else list(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        vessels = any("vessel_psnr" in r for r in records)
        fields = CSV_FIELDS if vessels else CSV_FIELDS[:-2]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in _paired_deltas(records):
            w.writerow({k: (_csv_num(v) if isinstance(v, float) else v) for k, v in r.items()})
        if isinstance(result, EvalResult):
            for name, why in result.unavailable.items():
                w.writerow({"image": "-", "method": name, "kind": f"not available: {why}"})
    return path


def _csv_num(v: float) -> str:
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.6g}"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if np.isinf(v).any():
        return float(v.mean()), float("nan")  # mean is +/-inf, spread undefined
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(result: EvalResult | Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per method (in evaluation order): n, mean/std of PSNR, SSIM, LPIPS, seconds, deltas vs bicubic.

    Deltas are means of per-image paired differences against the bicubic row of the same image.
    """
    records = result.records if isinstance(result, EvalResult) else list(result)
    if methods is None:
        methods = result.methods if isinstance(result, EvalResult) else list(dict.fromkeys(r["method"] for r in records))
    recs = _paired_deltas(records)
    rows = []
    for m in methods:
        rs = [r for r in recs if r["method"] == m]
        if not rs:
            continue
        row: dict[str, Any] = {"method": m, "kind": rs[0]["kind"], "n": len(rs)}
        for key in ("psnr", "ssim", "lpips", "seconds", "d_psnr_vs_bicubic", "d_ssim_vs_bicubic"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in rs])
        if "vessel_psnr" in rs[0]:
            for key in ("vessel_psnr", "d_vessel_psnr_vs_bicubic"):
                row[key], row[key + "_std"] = _mean_std([r[key] for r in rs])
            row["n_better"] = sum(1 for r in rs if r["d_psnr_vs_bicubic"] > 0)
        rows.append(row)
    return rows


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isinf(mean):
        return "inf" if mean > 0 else "-inf"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_delta(v: float, digits: int) -> str:
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:+.{digits}f}"


def markdown_table(result: EvalResult | Sequence[dict[str, Any]], methods: Sequence[str] | None = None) -> str:
    """Markdown table: method | n | PSNR | SSIM | LPIPS | ΔPSNR vs bicubic | ΔSSIM vs bicubic | s/img."""
    rows = summarize(result, methods)
    vessels = any("vessel_psnr" in r for r in rows)
    head = "| method | n | PSNR (dB) | SSIM | LPIPS | ΔPSNR vs bicubic | ΔSSIM vs bicubic | s/img |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if vessels:
        head += " vessel PSNR (dB) | Δvessel PSNR vs bicubic | images > bicubic |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        name = f"**{r['method']}**" if r["method"] == REFERENCE else r["method"]
        line = (
            f"| {name} | {r['n']} | {_fmt(r['psnr'], r['psnr_std'], 2)} | {_fmt(r['ssim'], r['ssim_std'], 4)} "
            f"| {_fmt(r['lpips'], r['lpips_std'], 4)} | {_fmt_delta(r['d_psnr_vs_bicubic'], 2)} "
            f"| {_fmt_delta(r['d_ssim_vs_bicubic'], 4)} | {_fmt(r['seconds'], float('nan'), 2)} |"
        )
        if vessels:
            line += (
                f" {_fmt(r.get('vessel_psnr', float('nan')), r.get('vessel_psnr_std', float('nan')), 2)} "
                f"| {_fmt_delta(r.get('d_vessel_psnr_vs_bicubic', float('nan')), 2)} "
                f"| {r.get('n_better', 0)}/{r['n']} |"
            )
        lines.append(line)
    if isinstance(result, EvalResult):
        ncol = rule.count("|") - 1
        for name, why in result.unavailable.items():
            lines.append(f"| {name} | 0 | not available: {why} |" + " |" * (ncol - 2))
    return "\n".join(lines) + "\n"


def summary_markdown(result: EvalResult, title: str = "medsr-eval", extra: Sequence[str] = ()) -> str:
    n_img = len({r["image"] for r in result.records})
    parts = [
        f"# {title}",
        "",
        f"Protocol: {result.config.describe()}.",
        f"Images: {n_img}. Mean ± sample std over images; Δ = mean per-image difference vs bicubic "
        "(positive PSNR/SSIM delta = better than bicubic). LPIPS: "
        + ("AlexNet LPIPS (lower is better)." if result.lpips_available else "n/a (no `lpips` package with weights)."),
        *extra,
        "",
        markdown_table(result),
    ]
    return "\n".join(parts)


# --- figure -------------------------------------------------------------------------------------------


def pick_crop(gt: np.ndarray, size: int, scale: int = 1) -> tuple[int, int]:
    """Top-left (y, x) of the ``size``^2 window with the most fine detail in GT, scale-aligned.

    Detail = local energy of GT minus its Gaussian blur (sigma 2): edges and texture an SR model must
    restore, not the large body/background contrast. Windows keep off the outer 10% of the image
    (radiograph borders: labels, collimator edges).
    """
    import cv2

    g = (gt.mean(axis=2) if gt.ndim == 3 else gt).astype(np.float32)
    h, w = g.shape
    size = min(size, h, w)
    hp = g - cv2.GaussianBlur(g, (0, 0), 2.0)
    energy = cv2.boxFilter(hp * hp, -1, (size, size), anchor=(0, 0), normalize=True, borderType=cv2.BORDER_CONSTANT)

    def bounds(n: int) -> tuple[int, int]:
        lo, hi = int(0.1 * n), n - size - int(0.1 * n)
        return (lo, hi + 1) if hi >= lo else (0, n - size + 1)

    (y0, y1), (x0, x1) = bounds(h), bounds(w)
    region = energy[y0:y1, x0:x1]
    dy, dx = np.unravel_index(int(np.argmax(region)), region.shape)
    y, x = int(dy + y0), int(dx + x0)
    step = max(1, scale)
    return y - y % step, x - x % step


def save_figure(
    sample: Sample,
    path: str | Path,
    scale: int,
    methods: Sequence[str] | None = None,
    crop: int | None = None,
    dpi: int = 100,
) -> Path:
    """PNG of magnified crops side by side: LR | bicubic | models ... | ground truth (paper Figs. 7-8).

    ``methods``: the SR panels to show (default: bicubic then every model output in the sample).
    Each SR panel is titled with its PSNR/SSIM on the whole image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, thread-safe

    gt = sample.gt
    h, w = gt.shape[:2]
    crop = crop or max(16, min(h, w) // 4)
    crop = min(crop - crop % scale, h, w) or min(h, w)
    y, x = pick_crop(gt, crop, scale)
    if methods is None:
        methods = [m for m in sample.outputs if m == "bicubic"] + [
            m for m in sample.outputs if m not in ("nearest", "bilinear", "bicubic", "lanczos")
        ]
    lr_crop = sample.lr[y // scale:(y + crop) // scale, x // scale:(x + crop) // scale]
    panels = [(f"LR (x{scale}, nearest)", np.repeat(np.repeat(lr_crop, scale, 0), scale, 1))]
    for m in methods:
        p, s = sample.scores.get(m, (float("nan"), float("nan")))
        ptxt = "inf" if math.isinf(p) else f"{p:.2f}"
        panels.append((f"{m}\n{ptxt} dB / {s:.4f}", sample.outputs[m][y:y + crop, x:x + crop]))
    panels.append(("ground truth", gt[y:y + crop, x:x + crop]))

    n = len(panels)
    fig = Figure(figsize=(2.6 * n, 3.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (title, img) in zip(axes, panels, strict=True):
        img = np.clip(img, 0, 1)
        if img.shape[2] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{sample.image}: crop {crop}x{crop} at (y={y}, x={x})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_reports(result: EvalResult, out_dir: str | Path, extra: Sequence[str] = ()) -> dict[str, Path]:
    """results.csv, summary.md and figure.png (when a sample was kept) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(result, out / "results.csv")}
    md = out / "summary.md"
    md.write_text(summary_markdown(result, extra=extra), encoding="utf-8")
    paths["summary"] = md
    if result.sample is not None:
        paths["figure"] = save_figure(result.sample, out / "figure.png", result.config.scale)
        if result.sample.mask is not None:
            paths["vessel_figure"] = save_vessel_figure(result.sample, out / "vessels.png", result.config.scale)
    return paths


def pick_vessel_crops(mask: np.ndarray, size: int, n: int = 2, scale: int = 1) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` non-overlapping ``size``^2 windows with the most vessel-mask pixels."""
    import cv2

    m = mask.astype(np.float32)
    h, w = m.shape
    size = min(size, h, w)
    dens = cv2.boxFilter(m, -1, (size, size), anchor=(0, 0), normalize=True, borderType=cv2.BORDER_CONSTANT)
    dens = dens[: h - size + 1, : w - size + 1].copy()
    out: list[tuple[int, int]] = []
    for _ in range(n):
        if dens.size == 0 or not np.isfinite(dens).any() or dens.max() < 0:
            break
        y, x = (int(v) for v in np.unravel_index(int(np.argmax(dens)), dens.shape))
        y, x = y - y % max(1, scale), x - x % max(1, scale)
        out.append((y, x))
        dens[max(0, y - size + 1): y + size, max(0, x - size + 1): x + size] = -1.0  # no overlap
    return out


def save_vessel_figure(
    sample: Sample, path: str | Path, scale: int, methods: Sequence[str] | None = None, crop: int = 64,
    n_crops: int = 2, magnify: int = 4, dpi: int = 100,
) -> Path:
    """PNG of magnified vessel crops (rows: the ``n_crops`` windows densest in the truth's vessel mask;
    columns: LR | each method | truth | mask), each panel titled with the method's vessel PSNR in the crop."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medsr.eval.vessels import masked_psnr

    if sample.mask is None:
        raise ValueError("the sample carries no vessel mask (retina protocol only)")
    gt, mask = sample.gt, sample.mask
    crop = min(crop - crop % scale, *gt.shape[:2])
    corners = pick_vessel_crops(mask, crop, n_crops, scale)
    if methods is None:
        methods = [m for m in ("bicubic", "lanczos") if m in sample.outputs] + [
            m for m in sample.outputs if m not in ("nearest", "bilinear", "bicubic", "lanczos")
        ]
    ncol = len(methods) + 3
    fig = Figure(figsize=(2.2 * ncol, 2.5 * len(corners) + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(corners), ncol, squeeze=False)
    for row, (y, x) in enumerate(corners):
        sl = (slice(y, y + crop), slice(x, x + crop))
        lr = sample.lr[y // scale:(y + crop) // scale, x // scale:(x + crop) // scale]
        panels = [(f"LR x{scale} (nearest)", np.repeat(np.repeat(lr, scale, 0), scale, 1))]
        for m in methods:
            v = masked_psnr(sample.outputs[m][sl], gt[sl], mask[sl])
            panels.append((f"{m}\nvessel {v:.2f} dB", sample.outputs[m][sl]))
        panels.append(("truth", gt[sl]))
        panels.append(("vessel mask", np.repeat(mask[sl][..., None].astype(np.float32), 3, axis=2)))
        for ax, (title, img) in zip(axes[row], panels, strict=True):
            img = np.clip(img, 0, 1)
            img = np.repeat(np.repeat(img, magnify, 0), magnify, 1)
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_axis_off()
        axes[row][0].text(0, -0.02, f"(y={y}, x={x})", transform=axes[row][0].transAxes, fontsize=6, va="top")
    fig.suptitle(f"{sample.image}: vessel crops {crop}x{crop}, magnified x{magnify}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
