"""The delivery room: the PACS on both ends. The DICOMweb session and client, the PACS source
(QIDO-RS/WADO-RS into the export bucket), the STOW-RS and C-STORE senders, the objects sent and
the bookkeeping of every delivery.

Imports :mod:`worker.core`, :mod:`worker.outputs` and :mod:`worker.infra`; never Celery.
Read :mod:`worker.delivery.deliveries` first.
"""
