"""Remote-control commands: ``celery -A worker inspect model_info``.

Answered by the worker's parent process, which never loads TensorFlow: the model's
name, version and checksum come from the weights file's metadata; whether it is
loaded, with which engine, on which device and how many studies were processed come from the status
files the pool processes keep (see :mod:`worker.overnight.runtime`).
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command


@inspect_command()  # type: ignore[untyped-decorator]
def model_info(state: Any, **_: Any) -> dict[str, Any]:
    """Model name, version, weights sha256, decision threshold, engine, device, loaded, studies processed.

    ``threshold`` is the one the workers apply: ``ICHVOL_THRESHOLD`` where set
    (``threshold_source`` "setting"), else the weights' calibrated one ("model").

    ``engine`` is what the pool processes run (``auto`` resolved: ``folded-bf16``, ``onnx``,
    ...); ``engine_setting`` is ``ICHVOL_INFERENCE_ENGINE`` as configured.
    """
    from worker.model.weights import model_reference
    from worker.overnight import runtime

    settings = state.consumer.app.conf.ichvol_settings
    try:
        info = model_reference(settings)
        model: dict[str, Any] = {
            "name": info.name,
            "version": info.version,
            "sha256": info.sha256,
            "architecture": info.architecture,
            "dims": info.dims,
            "input_size": info.input_size,
            "threshold": info.decision_threshold(settings.threshold),
            "threshold_source": "model" if settings.threshold is None else "setting",
        }
    except Exception as exc:
        model = {"error": str(exc)}
    children = runtime.children_status(settings)
    devices = sorted({c["device"] for c in children if c.get("device")})
    engines = sorted({c["engine"] for c in children if c.get("engine")})
    errors = sorted({c["load_error"] for c in children if c.get("load_error")})
    return {
        **model,
        "engine": ", ".join(engines) if engines else None,
        "engine_setting": settings.inference_engine,
        "device": ", ".join(devices) if devices else None,
        "loaded": bool(children) and all(c.get("loaded") for c in children),
        "processes": len(children),
        "load_errors": errors,
        "studies_processed": sum(int(c.get("succeeded", 0)) + int(c.get("failed", 0)) for c in children),
        "studies_succeeded": sum(int(c.get("succeeded", 0)) for c in children),
        "studies_failed": sum(int(c.get("failed", 0)) for c in children),
    }
