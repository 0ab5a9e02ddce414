"""The demo bucket: a few phantom studies of different kinds, plus one unusable export.

Used by ``ichvol demo``. Each study is a first-level folder of the bucket folder with a
``_COMPLETE`` marker, as a PACS export would leave it. The truth (exact volume) of each
phantom is returned so the demo can print it beside the measured volume.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from worker.synth.phantom import LesionSpec, PhantomSpec, generate_study

MARKER = "_COMPLETE"

#: (folder name, lesions) for the demo studies, in order; cycled if more are asked for.
DEMO_CASES: tuple[tuple[str, tuple[LesionSpec, ...]], ...] = (
    ("ich-round-25ml", (LesionSpec("round", volume_ml=25.0),)),
    ("ich-irregular-40ml", (LesionSpec("irregular", volume_ml=40.0),)),
    ("subdural-30ml", (LesionSpec("subdural", volume_ml=30.0),)),
    ("no-bleed", ()),
    ("epidural-15ml", (LesionSpec("epidural", volume_ml=15.0),)),
    ("ivh-8ml", (LesionSpec("intraventricular", volume_ml=8.0),)),
)


def make_demo_bucket(
    bucket: Path, *, n: int, seed: int, unusable: bool = True, rows: int = 256, pixel_spacing_mm: float = 0.9
) -> dict[str, float]:
    """Write ``n`` phantom studies (+ one scout-only export) into ``bucket``; return name -> true mL."""
    bucket.mkdir(parents=True, exist_ok=True)
    truth: dict[str, float] = {}
    for i in range(n):
        name, lesions = DEMO_CASES[i % len(DEMO_CASES)]
        if i >= len(DEMO_CASES):
            name = f"{name}-{i}"
        study = bucket / name
        spec = PhantomSpec(
            rows=rows,
            columns=rows,
            pixel_spacing_mm=(pixel_spacing_mm, pixel_spacing_mm),
            lesions=lesions,
            n_slices=28,
            patient_id=f"DEMO-{i + 1:03d}",
        )
        result = generate_study(study, spec=spec, seed=seed + i, truth_dir=bucket.parent / "truth" / name)
        (study / MARKER).write_text("complete\n")
        truth[name] = float(result.analytic_volume_ml)
    if unusable:
        # A realistic failure: the export holds only the scout of the study.
        scratch = bucket.parent / "scratch-scout"
        generate_study(
            scratch,
            spec=PhantomSpec(rows=64, columns=64, n_slices=5, lesions=(), extra_series=("scout",)),
            seed=seed + 999,
            truth_dir=scratch / "truth",
        )
        scout_only = bucket / "scout-only-export"
        scout_only.mkdir(exist_ok=True)
        for path in scratch.rglob("*.dcm"):
            import pydicom

            if "LOCALIZER" in list(pydicom.dcmread(path, stop_before_pixels=True).get("ImageType", [])):
                shutil.copy(path, scout_only / path.name)
        shutil.rmtree(scratch)
        (scout_only / MARKER).write_text("complete\n")
    return truth
