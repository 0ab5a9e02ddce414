"""``ichvol model-info``: a weights file's metadata as JSON, read without TensorFlow."""

from __future__ import annotations

import argparse
import json

from worker.core.settings import Settings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="model_path")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.model.weights import read_model_info, resolve_model_path

    path, is_default = resolve_model_path(settings.model_path)
    info = read_model_info(path)
    data = {**info.to_json(), "sha256": info.sha256, "path": str(path), "default": is_default}
    print(json.dumps(data, indent=2))
    return 0
