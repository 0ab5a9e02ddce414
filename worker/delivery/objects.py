"""The objects a delivery sends, built from a result: the stored SEG, the SR, the overlay SC.

Built after the result is committed, from the ``results`` row and the artefacts in the
results store; the SR and overlay UIDs derive from the SEG's, so a rebuild gives the same
instances.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import pydicom

from worker.core.settings import Settings
from worker.delivery.senders import DeliveryError, DicomObject, short_reason
from worker.infra.object_store import ObjectStore, StorageError
from worker.infra.tables import Result, Run
from worker.outputs import secondary_capture, sr
from worker.outputs.sr import PredecessorSr, VolumeReport

KIND_SEG = "seg"
KIND_SR = "sr"
KIND_OVERLAY = "overlay"


def store_key(store: ObjectStore, uri: str) -> str:
    """The key of ``uri`` (as returned by ``store.upload_file``) in ``store``.

    ``s3://bucket/key`` -> ``key``; ``file:///root/key`` -> ``key`` relative to the
    local store's root. Raises :class:`DeliveryError` (permanent) for another bucket.
    """
    parts = urlsplit(uri)
    if parts.scheme == "s3" and parts.netloc == getattr(store, "bucket", None):
        return unquote(parts.path.lstrip("/"))
    root = getattr(store, "root", None)
    if parts.scheme == "file" and root is not None:
        path = Path(unquote(parts.path))
        try:
            return path.relative_to(Path(root)).as_posix()
        except ValueError:
            pass
    raise DeliveryError(f"artefact {uri} is not in the results store {store!r}", transient=False)


def _download(store: ObjectStore, uri: str | None, dest: Path, what: str) -> Path:
    if not uri:
        raise DeliveryError(f"the result has no {what}", transient=False)
    try:
        store.download(store_key(store, uri), dest)
    except StorageError as exc:  # missing or forbidden; TransientError passes through
        raise DeliveryError(f"cannot read the {what} ({exc.message})", transient=False) from exc
    return dest


def report_of(result: Result, run: Run) -> VolumeReport:
    """The SR's numbers from a results row and its run."""
    return VolumeReport(
        volume_ml=float(result.volume_ml),
        abc2_ml=float(result.abc2_ml),
        n_slices=int(result.n_slices),
        pixel_spacing_mm=(float(result.pixel_spacing_row_mm), float(result.pixel_spacing_col_mm)),
        slab_thickness_mean_mm=float(result.slab_thickness_mean_mm),
        series_instance_uid=str(result.series_instance_uid),
        model_name=str(run.model_name),
        model_version=str(run.model_version),
        model_sha256=str(run.model_sha256 or ""),
        abc2_a_mm=result.abc2_a_mm,
        abc2_b_mm=result.abc2_b_mm,
        abc2_c_mm=result.abc2_c_mm,
    )


def build_objects(
    *,
    result: Result,
    run: Run,
    settings: Settings,
    store: ObjectStore,
    work_dir: Path,
    replaces: PredecessorSr | None = None,
) -> list[DicomObject]:
    """SEG, SR and overlay SC of one result, as the settings ask (order: SEG, SR, overlay).

    ``replaces``: the study's earlier SR the new one amends (its Predecessor Documents Sequence).
    Reads ``seg.dcm`` (and ``overlay.png``) from ``store`` (the results store) into ``work_dir``.
    Raises :class:`DeliveryError` (permanent) for a missing or unreadable artefact and
    :class:`TransientError` for storage trouble that may pass.
    """
    seg_path = _download(store, result.seg_uri, work_dir / "seg.dcm", "DICOM SEG (seg.dcm)")
    try:
        seg = pydicom.dcmread(seg_path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
        raise DeliveryError(f"the stored seg.dcm is not readable DICOM ({short_reason(exc)})", transient=False) from exc
    objects: list[DicomObject] = []
    if settings.pacs_send_seg:
        objects.append(DicomObject(KIND_SEG, seg))
    if settings.pacs_send_sr:
        try:
            report = sr.build_volume_sr(seg=seg, report=report_of(result, run), replaces=replaces)
            objects.append(DicomObject(KIND_SR, report))
        except ValueError as exc:
            raise DeliveryError(f"the SR could not be built: {exc}", transient=False) from exc
    if settings.pacs_send_overlay:
        png = _download(store, result.overlay_uri, work_dir / "overlay.png", "overlay picture (overlay.png)")
        try:
            rgb = secondary_capture.read_png_rgb(png)
            objects.append(DicomObject(KIND_OVERLAY, secondary_capture.build_overlay_sc(seg=seg, rgb=rgb)))
        except ValueError as exc:
            raise DeliveryError(f"the overlay could not be converted: {exc}", transient=False) from exc
    return objects
