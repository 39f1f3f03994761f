"""Per-volume adaptation, measured: simulate thick slices (r along axis k) from an isotropic evaluation volume,
fine-tune medsr-mr-tp on the thick volume's own in-plane slices (medsr-train --adapt, N minutes on the CPU), then
score the generic and the adapted model (and the baselines) against the original, as medsr-eval --volumes does.

usage: python benchmarks/volumes_adapt.py VOLUME.nii.gz OUT_DIR [--factor 4] [--minutes 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("volume", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--axis", type=int, default=2)
    a = ap.parse_args()

    from medsr.api import Upscaler
    from medsr.volumes import read_volume
    from medsr.volumes.evaluate import evaluate, table
    from medsr.volumes.training import simulate_thick

    a.out.mkdir(parents=True, exist_ok=True)
    truth = read_volume(a.volume)
    name = a.volume.name.split(".")[0]
    thick = simulate_thick(np.asarray(truth.array, np.float32), a.axis, a.factor)
    aff = truth.affine.copy()
    aff[:3, a.axis] *= a.factor
    thick_path = a.out / f"{name}_thick_r{a.factor}.nii.gz"
    nib.save(nib.Nifti1Image(thick, aff), str(thick_path))
    run = a.out / f"adapt_{name}_r{a.factor}"
    cmd = [sys.executable, "-m", "medsr.cli.train", "--adapt", str(thick_path), "--minutes", str(a.minutes),
           "-o", str(run), "-q"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    models = {"medsr-mr-tp": Upscaler.load("medsr-mr-tp"),
              "adapted": Upscaler.load(str(run / "mr_through_plane.pth"))}
    scores = evaluate(truth, models, name=name, factors=(a.factor,), axis=a.axis, log=print)
    text = table(scores)
    (a.out / f"adapt_{name}_r{a.factor}.md").write_text(
        f"Adaptation: {a.minutes:g} min of medsr-train --adapt on the thick volume's own in-plane slices\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
