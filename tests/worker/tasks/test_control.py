"""``celery -A worker inspect model_info``: what the parent answers, and the README's example of it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from worker.core.settings import Settings
from worker.model.engines import resolve_engine
from worker.model.weights import default_model_path, read_model_info
from worker.overnight import runtime
from worker.tasks.control import model_info

README = Path(__file__).resolve().parents[3] / "README.md"
AMD_ZEN4 = "vendor_id : AuthenticAMD\nflags : fpu avx2 avx512f avx512_bf16\n"


def _readme_example() -> dict[str, Any]:
    """The reply of the README's ``inspect model_info`` example (one worker)."""
    text = README.read_text(encoding="utf-8")
    start = text.index("```json", text.index("`inspect model_info` is answered"))
    block = text[start + len("```json") : text.index("```", start + len("```json"))]
    (reply,) = json.loads(block).values()
    assert isinstance(reply, dict)
    return reply


def _answer(settings: Settings) -> dict[str, Any]:
    conf = SimpleNamespace(ichvol_settings=settings)
    state = SimpleNamespace(consumer=SimpleNamespace(app=SimpleNamespace(conf=conf)))
    reply = model_info(state)
    assert isinstance(reply, dict)
    return reply


def test_model_info_reports_the_engine_the_pool_processes_run(tmp_path: Path) -> None:
    settings = Settings.from_env({}).replace(work_dir=str(tmp_path))
    runtime.init_parent(settings)
    status = {"loaded": True, "device": "CPU", "engine": "folded-bf16", "load_error": None, "succeeded": 3, "failed": 1}
    state_dir = runtime._state_dir(settings, os.getpid())
    (state_dir / "101.json").write_text(json.dumps({**status, "pid": 101}))
    reply = _answer(settings)
    assert reply["engine"] == "folded-bf16" and reply["engine_setting"] == "auto" == settings.inference_engine
    assert reply["loaded"] is True and reply["studies_processed"] == 4 and reply["studies_failed"] == 1
    shipped = read_model_info(default_model_path())
    assert (reply["threshold"], reply["threshold_source"]) == (shipped.threshold, "model")
    forced = _answer(settings.replace(threshold=0.4))
    assert (forced["threshold"], forced["threshold_source"]) == (0.4, "setting")


def test_the_readme_example_is_what_the_command_prints_for_the_shipped_model(tmp_path: Path) -> None:
    """Same keys as the answer, the shipped weights' version and checksum, the engine `auto` picks on the
    machine it names (an AMD EPYC Zen 4 with AVX512-BF16)."""
    example = _readme_example()
    settings = Settings.from_env({}).replace(work_dir=str(tmp_path))
    runtime.init_parent(settings)
    assert set(example) == set(_answer(settings))
    shipped = read_model_info(default_model_path())
    assert (example["name"], example["version"], example["dims"], example["input_size"]) == (
        shipped.name,
        shipped.version,
        shipped.dims,
        shipped.input_size,
    ), "README.md's inspect model_info example names other weights than the shipped ones"
    assert example["sha256"] == shipped.sha256
    assert (example["threshold"], example["threshold_source"]) == (shipped.threshold, "model")
    assert example["engine_setting"] == settings.inference_engine
    assert example["engine"] == resolve_engine("auto", cpuinfo=AMD_ZEN4, onnx_available=True)
