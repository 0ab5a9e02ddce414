"""A PACS as the study source: find new head CTs by QIDO-RS, copy them by WADO-RS into the export bucket.

For sites without an S3 export. :func:`pacs_poll_once` is a bridge, not a second
scheduler: it copies each matching PACS study's CT instances into the export bucket as
``<ICHVOL_EXPORT_PREFIX>/pacs-<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
and nothing else. The scheduler then treats the folder like any export, so the same
rules apply unchanged:

* stable-study rule: no marker is written, so a folder counts as complete once none of
  its objects changed for ``ICHVOL_QUIET_PERIOD_S``; a study still arriving in the PACS
  keeps gaining instances here and is not measured half-sent;
* fingerprints and idempotency: instances already in the bucket are not copied again
  (an unchanged study keeps its fingerprint, so the scheduler registers it once); an
  instance added later in the PACS changes the fingerprint, and the scheduler measures
  the new version, exactly as for a re-export.

Only series whose Modality is ``ICHVOL_PACS_SOURCE_MODALITY`` (CT) are copied. That also
keeps ichvol's own results (SR, SEG, OT series sent back to the same PACS) out of the
export, which would otherwise change the fingerprint after every delivery.

Which studies: QIDO-RS ``ModalitiesInStudy`` = the modality, ``StudyDate`` within the
last ``ICHVOL_PACS_SOURCE_LOOKBACK_H`` hours (whole days, the PACS's local dates), and,
when ``ICHVOL_PACS_SOURCE_DESCRIPTION`` is set, a StudyDescription containing one of its
words (case-insensitive).

The DICOMweb client is :class:`worker.delivery.dicomweb.DicomwebClient`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from worker.core.errors import ConfigurationError, TransientError
from worker.core.settings import Settings
from worker.delivery.dicomweb import DicomwebClient, DicomwebError, PacsStudy
from worker.infra.object_store import ObjectStore

log = logging.getLogger(__name__)

FOLDER_PREFIX = "pacs-"


@dataclass(frozen=True)
class PacsPollReport:
    """Counts of one PACS poll."""

    studies: int
    copied: int
    already_present: int
    skipped_series: int
    errors: int
    seconds: float

    def line(self) -> str:
        return (
            f"pacs-poll: {self.studies} studies, {self.copied} instances copied, {self.already_present} already "
            f"in the bucket, {self.skipped_series} series skipped (not the modality), {self.errors} errors, "
            f"{self.seconds:.2f} s"
        )


def study_folder(*, export_prefix: str, study_instance_uid: str) -> str:
    """The export-bucket folder of a PACS study (ends with ``/``)."""
    base = export_prefix.strip("/")
    return f"{base}/{FOLDER_PREFIX}{study_instance_uid}/" if base else f"{FOLDER_PREFIX}{study_instance_uid}/"


def _description_matches(description: str | None, words: Sequence[str]) -> bool:
    if not words:
        return True
    text = (description or "").lower()
    return any(word in text for word in words)


def study_query(settings: Settings, *, now: datetime) -> dict[str, str]:
    """QIDO-RS parameters: modality and a StudyDate range covering the lookback (whole days)."""
    since = (now - timedelta(hours=settings.pacs_source_lookback_h)).date()
    return {"ModalitiesInStudy": settings.pacs_source_modality, "StudyDate": f"{since:%Y%m%d}-"}


def _present_keys(store: ObjectStore, folder: str) -> set[str]:
    return {o.key for o in store.iter_objects(folder)}


def copy_study(
    *, client: DicomwebClient, store: ObjectStore, study: PacsStudy, settings: Settings
) -> tuple[int, int, int]:
    """Copy the study's missing instances of matching series; returns (copied, present, skipped series)."""
    folder = study_folder(export_prefix=settings.export_prefix, study_instance_uid=study.study_instance_uid)
    present = _present_keys(store, folder)
    copied = already = skipped = 0
    for series_uid, modality in client.search_series(study.study_instance_uid):
        if (modality or "").upper() != settings.pacs_source_modality.upper():
            skipped += 1
            continue
        for instance in client.search_instances(study.study_instance_uid, series_uid):
            key = f"{folder}{series_uid}/{instance.sop_instance_uid}.dcm"
            if key in present:
                already += 1
                continue
            data = client.retrieve_instance(instance)
            store.put_bytes(key, data, content_type="application/dicom")
            copied += 1
    return copied, already, skipped


def pacs_poll_once(
    *, client: DicomwebClient, store: ObjectStore, settings: Settings, now: datetime | None = None
) -> PacsPollReport:
    """Find matching studies in the PACS and copy their new CT instances into the export bucket.

    A study that fails (PACS error on its series or instances) is counted and skipped;
    the next poll tries it again. Raises :class:`TransientError` when the study search
    itself fails for a reason that may pass.
    """
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    words = [w.strip().lower() for w in (settings.pacs_source_description or "").split(",") if w.strip()]
    try:
        studies = client.search_studies(study_query(settings, now=now))
    except DicomwebError as exc:
        if exc.transient:
            raise TransientError(exc.message) from exc
        raise
    studies = [s for s in studies if _description_matches(s.description, words)]
    copied = already = skipped = errors = 0
    for study in studies:
        try:
            c, a, s = copy_study(client=client, store=store, study=study, settings=settings)
        except (DicomwebError, TransientError) as exc:
            errors += 1
            log.warning("PACS study not copied (will retry next poll): %s", exc.message)
            continue
        copied, already, skipped = copied + c, already + a, skipped + s
    report = PacsPollReport(
        studies=len(studies),
        copied=copied,
        already_present=already,
        skipped_series=skipped,
        errors=errors,
        seconds=round(time.perf_counter() - started, 3),
    )
    log.info(report.line())
    return report


def run_pacs_poll(settings: Settings, *, once: bool = False, stop: threading.Event | None = None) -> int:
    """``ichvol pacs-poll``: the bridge, once or every ``ICHVOL_POLL_INTERVAL_S``."""
    from worker.infra import storage

    if not settings.pacs_source_url:
        raise ConfigurationError("ICHVOL_PACS_SOURCE_URL is empty: no PACS to poll")
    stop = stop or threading.Event()
    client = DicomwebClient.from_settings(settings, url=settings.pacs_source_url)
    store = storage.open_store(settings.export_bucket, settings)
    try:
        while True:
            try:
                report = pacs_poll_once(client=client, store=store, settings=settings)
                if once:
                    print(report.line())
                    return 0 if report.errors == 0 else 1
            except (TransientError, DicomwebError) as exc:
                log.warning("PACS poll failed, will retry: %s", exc.message)
                if once:
                    print(f"ichvol pacs-poll: {exc.message}")
                    return 1
            if stop.wait(settings.poll_interval_s):
                return 0
    finally:
        client.close()
