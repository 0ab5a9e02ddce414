"""Site adaptation (AdaBN): BatchNorm statistics recomputed on a site's own unlabelled studies.

Research use only, not for clinical use.

``ichvol adapt STUDIES --out WEIGHTS.keras [--model BASE]``. A model trained on synthetic
data normalises its features with statistics of synthetic slices; a site's scanner,
kernel and patients shift them. AdaBN (Li et al., 2016) recomputes every BatchNormalization
layer's moving mean and variance over the site's own slices and leaves every other weight
unchanged: no labels, no gradient, minutes on a CPU.

* ``STUDIES``: one study per subfolder (any nesting and file names inside, as ``ichvol
  run`` reads an export folder). Each study's series is selected exactly as ``ichvol
  segment`` selects it (:func:`worker.imaging.dicom_load.load_study`), its slices prepared exactly as
  inference prepares them (:func:`worker.preprocess.to_model_input`: the model's window,
  square padding, its input size). Studies that fail selection are listed with their
  reason and code and skipped.
* Fewer than :data:`MIN_STUDIES` usable studies: refused (:class:`ConfigurationError`, exit
  2), nothing written: five studies are the least that average out one patient's anatomy.
* The statistics are the average of per-batch statistics over every slice, in batches of
  16 shuffled across studies (the recipe training uses before each validation, "precise
  BatchNorm", :func:`worker.training.recalibrate_batchnorm`).
* The new weights file records its provenance (base version and sha256, method, numbers of
  studies and slices, date) and gets the version ``<base>-adapted-<8 hex>``, the hex a hash
  of the base and the studies' series UIDs. The default weights are never overwritten;
  workers use the result through ``ICHVOL_MODEL``, and every result row records the
  model version, so a rollback is unsetting that variable.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.core.errors import ConfigurationError, StudyError
from worker.imaging.series_selection import SelectionRules
from worker.model import preprocess
from worker.model.weights import ModelInfo, default_model_path, read_model_info, resolve_model_path

__all__ = [
    "DEFAULT_BATCHNORM_LAYERS",
    "DEFAULT_SITE_SHARE",
    "MIN_STUDIES",
    "AdaptationReport",
    "SkippedStudy",
    "adabn_batches",
    "adapt_model",
    "batchnorm_statistics",
    "blend_batchnorm_statistics",
    "collect_site_slices",
    "study_folders",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

MIN_STUDIES = 5
BATCH_SIZE = 16
#: The site's share of the adapted statistics (1.0: plain AdaBN). Chosen on the real yardstick
#: (MODEL_CARD.md, "Site adaptation"): plain AdaBN over a few bleed-heavy slices hurt there.
DEFAULT_SITE_SHARE = 1.0
#: How many BatchNorm layers, from the input, take the site's statistics (None: all, plain
#: AdaBN). Chosen on the real yardstick (MODEL_CARD.md, "Site adaptation"): the stem alone
#: (the first layer, which normalises the first convolution's response to the HU) raised
#: the two-fold real-slice Dice, every deeper choice lowered it.
DEFAULT_BATCHNORM_LAYERS: int | None = 1


@dataclass(frozen=True)
class SkippedStudy:
    name: str
    code: str
    reason: str


@dataclass(frozen=True)
class SiteSlices:
    """Model-ready slices ``(n, S, S)`` in [-1, 1] of the usable studies, and what was skipped."""

    images: F32
    used: tuple[str, ...]
    series_uids: tuple[str, ...]
    skipped: tuple[SkippedStudy, ...]


@dataclass(frozen=True)
class AdaptationReport:
    out_path: Path
    base: ModelInfo
    adapted: ModelInfo
    n_studies: int
    n_slices: int
    skipped: tuple[SkippedStudy, ...]
    seconds: float


def study_folders(root: Path) -> list[Path]:
    """The studies under ``root``: its immediate subfolders, sorted by name (hidden ones ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigurationError(f"{root} is not a folder")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def collect_site_slices(
    studies: list[Path], *, info: ModelInfo, rules: SelectionRules, progress: bool = False
) -> SiteSlices:
    """Every usable study's selected series as model input (module docstring)."""
    images: list[F32] = []
    used: list[str] = []
    uids: list[str] = []
    skipped: list[SkippedStudy] = []
    from worker.imaging.dicom_load import load_study

    iterable: Iterable[Path] = studies
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: drawn on a terminal only, so a log or a pipe gets just the summary line
        bar = tqdm(studies, desc="reading studies", unit="study", dynamic_ncols=True, disable=None)
        iterable = bar
    for study in iterable:
        try:
            series = load_study(study, rules=rules)
        except StudyError as error:
            skipped.append(SkippedStudy(study.name, error.code.value, error.message))
            continue
        x, _fit = preprocess.to_model_input(series.hu, size=info.input_size, window=info.hu_window)
        images.append(x.astype(np.float32))
        used.append(study.name)
        uids.append(series.series_instance_uid)
    if bar is not None:
        bar.close()
    size = info.input_size
    stacked = np.concatenate(images) if images else np.zeros((0, size, size), np.float32)
    return SiteSlices(stacked, tuple(used), tuple(uids), tuple(skipped))


def adabn_batches(images: F32, *, seed: int) -> list[F32]:
    """Model-ready slices ``(n, S, S)`` as shuffled batches ``(b, S, S, 1)`` of :data:`BATCH_SIZE`
    for :func:`worker.research.training.recalibrate_batchnorm` (a last batch of one is left
    out: it has no variance)."""
    order = np.random.default_rng(seed).permutation(len(images))
    return [
        images[order[i : i + BATCH_SIZE], ..., None]
        for i in range(0, len(order), BATCH_SIZE)
        if len(order[i : i + BATCH_SIZE]) >= 2
    ]


def batchnorm_statistics(model: object) -> list[tuple[F32, F32]]:
    """Every BatchNormalization layer's (moving mean, moving variance), in layer order (copies)."""
    from worker.model.networks import norm_layers

    return [
        (
            np.array(layer.moving_mean.numpy(), dtype=np.float32),
            np.array(layer.moving_variance.numpy(), dtype=np.float32),
        )
        for layer in norm_layers(model)
    ]


def blend_batchnorm_statistics(
    model: object, source: list[tuple[F32, F32]], site_share: float, *, layers: int | None = None
) -> None:
    """Mix the model's current (site) BatchNorm statistics with ``source`` ones, in place.

    The result is the statistics of the mixture "``site_share`` of the site's features, the
    rest the training data's": mean ``(1-s) m0 + s m1``, variance ``(1-s) v0 + s v1 + s (1-s)
    (m1 - m0)^2``. ``site_share`` 1 leaves plain AdaBN, 0 restores the source statistics.
    ``layers``: only the first this many BatchNorm layers (in layer order, from the input:
    the encoder's first) are mixed; every later one gets its source statistics back. None: all.
    """
    if not 0.0 <= site_share <= 1.0:
        raise ConfigurationError(f"the site share must be between 0 and 1, got {site_share}")
    from worker.model.networks import norm_layers

    if layers is not None and layers < 0:
        raise ConfigurationError(f"the number of adapted BatchNorm layers must be 0 or more, got {layers}")
    norms = norm_layers(model)
    if len(norms) != len(source):
        raise ValueError(f"{len(source)} source statistics for {len(norms)} BatchNorm layers")
    s = float(site_share)
    for k, (layer, (mean0, var0)) in enumerate(zip(norms, source, strict=True)):
        if layers is not None and k >= layers:
            layer.moving_mean.assign(mean0)
            layer.moving_variance.assign(var0)
            continue
        mean1 = np.asarray(layer.moving_mean.numpy(), dtype=np.float64)
        var1 = np.asarray(layer.moving_variance.numpy(), dtype=np.float64)
        mean = (1.0 - s) * mean0 + s * mean1
        var = (1.0 - s) * var0 + s * var1 + s * (1.0 - s) * (mean1 - mean0) ** 2
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(var.astype(np.float32))


def _version(base: ModelInfo, series_uids: tuple[str, ...], site_share: float = 1.0, layers: int | None = None) -> str:
    share = "" if site_share == 1.0 else f"\nshare {site_share:g}"
    share += "" if layers is None else f"\nlayers {layers}"
    digest = hashlib.sha256((base.sha256 + "\n" + "\n".join(sorted(series_uids)) + share).encode()).hexdigest()[:8]
    return f"{base.version}-adapted-{digest}"


def adapt_model(
    *,
    studies_dir: Path,
    out_path: Path,
    base_model: Path | None = None,
    rules: SelectionRules | None = None,
    min_studies: int = MIN_STUDIES,
    seed: int = 0,
    progress: bool = False,
    site_share: float = DEFAULT_SITE_SHARE,
    batchnorm_layers: int | None = DEFAULT_BATCHNORM_LAYERS,
) -> AdaptationReport:
    """AdaBN on the studies in ``studies_dir``; writes the adapted weights to ``out_path``.

    ``site_share`` (0 to 1) is the site's share of the new statistics
    (:func:`blend_batchnorm_statistics`; 1: plain AdaBN). ``batchnorm_layers``: only the
    first this many BatchNorm layers from the input are adapted (None: every one).

    Raises :class:`ConfigurationError` (nothing written) when ``out_path`` would overwrite
    the shipped default or the base weights, or fewer than ``min_studies`` studies are usable.
    """
    import time

    started = time.perf_counter()
    out_path = Path(out_path)
    base_path, _ = resolve_model_path(base_model)
    for protected in (default_model_path(), base_path):
        if out_path.exists() and out_path.resolve() == Path(protected).resolve():
            raise ConfigurationError(f"--out {out_path} would overwrite {protected.name}: write a new file")
    if not 0.0 < site_share <= 1.0:
        raise ConfigurationError(f"--site-share must be above 0 and at most 1, got {site_share}")
    if batchnorm_layers is not None and batchnorm_layers < 1:
        raise ConfigurationError(f"--batchnorm-layers must be at least 1 or all, got {batchnorm_layers}")
    if out_path.suffix != ".keras":
        raise ConfigurationError(f"--out must be a .keras file, got {out_path.name}")
    base = read_model_info(base_path)
    studies = study_folders(studies_dir)
    site = collect_site_slices(studies, info=base, rules=rules or SelectionRules(), progress=progress)
    if len(site.used) < min_studies:
        skipped = "; ".join(f"{s.name}: {s.reason} [{s.code}]" for s in site.skipped) or "none"
        raise ConfigurationError(
            f"adaptation needs at least {min_studies} usable studies, {studies_dir} has {len(site.used)} "
            f"of {len(studies)} (skipped: {skipped}); nothing was written"
        )
    from worker.model.networks import load_keras_model, save_model
    from worker.research.training import recalibrate_batchnorm

    model = load_keras_model(base_path)
    source = batchnorm_statistics(model)
    recalibrate_batchnorm(model, adabn_batches(site.images, seed=seed))
    if site_share < 1.0 or batchnorm_layers is not None:
        blend_batchnorm_statistics(model, source, site_share, layers=batchnorm_layers)
    which = "every BatchNorm layer" if batchnorm_layers is None else f"the first {batchnorm_layers} BatchNorm layer(s)"
    now = datetime.now(UTC).isoformat(timespec="seconds")
    adapted = replace(
        base,
        version=_version(base, site.series_uids, site_share, batchnorm_layers),
        created=now,
        sha256="",
        training_data=(
            f"{base.training_data}; then BatchNorm statistics of {which} adapted (AdaBN) to {len(site.used)} "
            f"unlabelled site studies ({len(site.images)} slices; site share {site_share:g}), every other weight "
            "unchanged"
        ),
        provenance={
            "method": "adabn",
            "base_version": base.version,
            "base_sha256": base.sha256,
            "n_studies": len(site.used),
            "n_slices": len(site.images),
            "n_skipped": len(site.skipped),
            "site_share": site_share,
            "batchnorm_layers": "all" if batchnorm_layers is None else batchnorm_layers,
            "date": now,
        },
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out_path, adapted)
    written = read_model_info(out_path)
    log.info("adapted %s to %d studies: %s", base.version, len(site.used), written.version)
    return AdaptationReport(
        out_path=out_path,
        base=base,
        adapted=written,
        n_studies=len(site.used),
        n_slices=len(site.images),
        skipped=site.skipped,
        seconds=time.perf_counter() - started,
    )
