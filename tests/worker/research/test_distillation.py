"""Distillation (ichvol adapt --teacher blast-ct): cached labels, a held-out fifth, provenance, refusals, the loss."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.helpers.phantom import TINY_SITE_STUDY, write_small_site
from tests.helpers.series_builders import ring_skull_slice
from worker.core.errors import ConfigurationError
from worker.model import preprocess
from worker.model.weights import read_model_info
from worker.research import distillation
from worker.research.distillation import split_held_out

TINY = TINY_SITE_STUDY


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small phantom studies and one folder without any image."""
    return write_small_site(tmp_path_factory.mktemp("site"))


@pytest.fixture()
def teacher_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts every run of the teacher (``predict_teacher``) by series UID."""
    from worker.measure import teacher as teacher_module

    calls: list[str] = []
    real = teacher_module.predict_teacher

    def counting(series: Any, teacher: Any) -> Any:
        calls.append(series.series_instance_uid)
        return real(series, teacher)

    monkeypatch.setattr(teacher_module, "predict_teacher", counting)
    return calls


# --- the soft-target loss: the project's BCE + Dice, by hand ----------------------------------


def test_the_project_loss_takes_soft_targets_as_computed_by_hand() -> None:
    from worker.model import losses

    y = np.array([0.5, 0.0, 1.0, 0.25], dtype=np.float32).reshape(1, 2, 2, 1)
    p = np.array([0.5, 0.1, 0.9, 0.25], dtype=np.float32).reshape(1, 2, 2, 1)
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    dice = (2 * np.sum(y * p) + 1.0) / (np.sum(y) + np.sum(p) + 1.0)  # smooth 1, per image
    assert float(losses.bce_loss(y, p)) == pytest.approx(bce, rel=1e-5)
    assert float(losses.dice_loss(y, p)) == pytest.approx(1.0 - dice, rel=1e-5)
    assert float(losses.bce_dice_loss(y, p)) == pytest.approx(bce + 1.0 - dice, rel=1e-5)
    # BCE is smallest where the prediction equals the soft target (its gradient is p - y there).
    for shift in (-0.05, 0.05):
        moved = np.clip(y + shift, 0.01, 0.99).astype(np.float32)
        assert float(losses.bce_loss(y, moved)) > float(losses.bce_loss(y, np.clip(y, 0.01, 0.99)))


def test_soft_targets_are_resampled_like_the_input() -> None:
    prob = np.zeros((1, 2, 4), dtype=np.float32)
    prob[0, 0, :2] = 1.0  # top-left 2 pixels
    fit = preprocess.Fit.for_shape(2, 4, size=2)  # padded to 4x4 (one row of air above and below), halved
    small = preprocess.soft_to_model(prob, fit)
    assert small.shape == (1, 2, 2) and small.dtype == np.float32
    np.testing.assert_allclose(small[0], [[0.5, 0.0], [0.0, 0.0]], atol=1e-6)  # area: 2 of 4 pixels


def test_temperature_softens_or_sharpens_the_teacher_and_keeps_its_mask() -> None:
    p = np.array([0.001, 0.3, 0.5, 0.9, 0.999], dtype=np.float32)
    np.testing.assert_array_equal(distillation.tempered(p, 1.0), p)
    # sigmoid(logit(p) / T) by hand: logit(0.9) = ln 9 = 2.1972, logit(0.3) = -0.8473
    np.testing.assert_allclose(distillation.tempered(p, 2.0)[[1, 2, 3]], [0.3958, 0.5, 0.75], atol=2e-4)
    np.testing.assert_allclose(distillation.tempered(p, 0.5)[3], 81 / 82, atol=2e-4)  # 9**2 : 1
    for t in (0.5, 2.0, 4.0):
        q = distillation.tempered(p, t)
        assert np.all(np.diff(q) > 0) and np.array_equal(q >= 0.5, p >= 0.5)
    with pytest.raises(ConfigurationError, match="temperature"):
        distillation.tempered(p, 0.0)


def _series_with_blood() -> Any:
    """One 96 x 96 slice at 1 mm: a closed skull, a 10 x 10 px 70 HU bleed, a 60 HU spot far from it."""
    hu = ring_skull_slice()
    hu[40:50, 40:50] = 70.0
    hu[60:63, 60:63] = 60.0
    return SimpleNamespace(hu=hu[None], pixel_spacing_mm=(1.0, 1.0))


def test_targets_soft_grown_and_union() -> None:
    from worker.measure.pipeline import SegmentationOptions

    series = _series_with_blood()
    teacher = np.zeros(series.hu.shape, dtype=np.float32)
    teacher[0, 44:46, 44:46] = 0.9  # the teacher's confident core of the bleed
    options = SegmentationOptions()
    soft = distillation.distillation_targets(teacher, series, targets="soft", options=options)
    np.testing.assert_array_equal(soft, teacher)
    grown = distillation.distillation_targets(teacher, series, targets="grown", options=options)
    assert grown[0, 40:50, 40:50].min() == 1.0, "the core grows into the whole 70 HU bleed"
    assert grown[0, 60:63, 60:63].max() == 0.0 and grown.sum() == 100.0, "never into blood it is not connected to"
    base = np.zeros(series.hu.shape, dtype=np.uint8)
    base[0, 60:63, 60:63] = 1  # the base model's own find, which the teacher does not call
    union = distillation.distillation_targets(teacher, series, targets="union", options=options, base_mask=base)
    np.testing.assert_array_equal(union, np.maximum(grown, base))
    with pytest.raises(ConfigurationError, match="base model"):
        distillation.distillation_targets(teacher, series, targets="union", options=options)
    with pytest.raises(ConfigurationError, match="unknown distillation targets"):
        distillation.distillation_targets(teacher, series, targets="hard", options=options)


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [False, True])
def test_fine_tuning_moves_the_batchnorm_statistics_unless_frozen(tiny_model_path: Path, freeze: bool) -> None:
    from worker.model.networks import load_keras_model
    from worker.research.adaptation import batchnorm_statistics

    model = load_keras_model(tiny_model_path)
    before = batchnorm_statistics(model)
    kernels = [np.array(w) for w in model.get_weights()]
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, 32, 32)).astype(np.float32) * 0.5 + 0.3  # not the init's N(0, 1)
    targets = (rng.uniform(size=(8, 32, 32)) > 0.8).astype(np.float32)
    config = distillation.DistillConfig(
        studies_dir=Path("."),
        out_path=Path("x.keras"),
        teacher=None,  # type: ignore[arg-type]
        epochs=1,
        steps_per_epoch=3,
        batch_size=4,
        learning_rate=1e-2,
        freeze_batchnorm=freeze,
    )
    distillation.fine_tune(model, images=images, targets=targets, bank=None, config=config)
    after = batchnorm_statistics(model)
    moved = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(after, before, strict=True))
    assert (moved == 0.0) if freeze else (moved > 1e-3)
    assert any(not np.array_equal(a, b) for a, b in zip(model.get_weights(), kernels, strict=True)), "it trained"
    assert all(layer.trainable for layer in model.layers), "BatchNorm trainable again afterwards"


def test_the_held_out_fifth_is_fixed_by_the_names() -> None:
    names = [f"study-{i}" for i in range(12)]
    train, held = split_held_out(names)
    assert len(held) == 2 and set(train) | set(held) == set(names) and not set(train) & set(held)
    assert split_held_out(list(reversed(names)))[1] == tuple(n for n in reversed(names) if n in held)
    assert len(split_held_out(names[:5])[1]) == 1


# --- the command end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_the_command_runs_end_to_end_and_never_trains_on_the_held_out_fifth(
    site: Path,
    tiny_model_path: Path,
    tiny_teacher: Any,
    teacher_calls: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker import cli
    from worker.measure import teacher as teacher_module

    monkeypatch.setattr(teacher_module, "load_teacher", lambda models=None, *, engine="auto", threads=0: tiny_teacher)
    trained_on: list[str] = []
    site_slices = distillation._site_slices

    def spy(studies: Any, **kwargs: Any) -> Any:
        trained_on.extend(s.name for s in studies)
        return site_slices(studies, **kwargs)

    monkeypatch.setattr(distillation, "_site_slices", spy)
    out = tmp_path / "distilled.keras"
    argv = ["adapt", "--teacher", "blast-ct", str(site), "--out", str(out), "--model", str(tiny_model_path)]
    argv += ["--epochs", "1", "--steps-per-epoch", "2", "--synthetic-samples", "8"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert len(teacher_calls) == 6 and "6 studies (0 from the cache)" in printed
    assert "held-out agreement with the teacher (1 studies never trained on)" in printed
    assert "skipped no-images" in printed and "distilled tiny-test-1 on 5 studies (30 slices)" in printed

    agreement = json.loads((tmp_path / "distilled.agreement.json").read_text())
    held_out = [r["study"] for r in agreement["distilled"]["studies"]]
    assert len(held_out) == 1 and [r["study"] for r in agreement["base"]["studies"]] == held_out
    assert held_out == list(split_held_out([f"study-{i}" for i in range(6)])[1])
    assert sorted(trained_on) == sorted(f"study-{i}" for i in range(6) if f"study-{i}" not in held_out)
    for model in ("distilled", "base"):
        assert 0.0 <= agreement[model]["mean_dice"] <= 1.0

    base = read_model_info(tiny_model_path)
    info = read_model_info(out)
    assert info.version.startswith(f"{base.version}-distilled-") and len(info.version.rsplit("-", 1)[1]) == 8
    prov = info.provenance
    assert prov["method"] == "distillation" and prov["base_sha256"] == base.sha256
    assert prov["base_version"] == base.version
    assert prov["teacher_models"] == list(tiny_teacher.names) and prov["teacher_sha256"] == list(tiny_teacher.sha256)
    assert prov["n_studies_train"] == 5 and prov["n_studies_held_out"] == 1 and prov["n_slices_train"] == 30
    assert prov["epochs"] == 1 and prov["targets"] == "grown" and prov["adabn"] is True and prov["date"]
    assert prov["batchnorm_layers"] == 1 and prov["freeze_batchnorm"] is False
    cache = tmp_path / "teacher-labels"
    assert len(list(cache.glob("study-*.npz"))) == 6 and not list(cache.glob("*.tmp*"))

    result = tmp_path / "seg"
    assert cli.main(["segment", str(site / "study-2"), "--out", str(result), "--model", str(out)]) == 0
    assert json.loads((result / "result.json").read_text())["model"]["version"] == info.version

    # union targets at temperature 2 from the same cache: the teacher does not run again
    teacher_calls.clear()
    union = tmp_path / "union.keras"
    argv[argv.index(str(out))] = str(union)
    argv += ["--cache", str(cache), "--targets", "union", "--temperature", "2", "--freeze-batchnorm"]
    assert cli.main([*argv, "--batchnorm-layers", "all"]) == 0
    assert teacher_calls == [] and "6 studies (6 from the cache)" in capsys.readouterr().out
    prov = read_model_info(union).provenance
    assert prov["targets"] == "union" and prov["temperature"] == 2.0 and prov["freeze_batchnorm"] is True
    assert prov["batchnorm_layers"] == "all" and "every layer" in read_model_info(union).training_data
    assert read_model_info(union).version != info.version


def test_a_rerun_reuses_the_cached_labels_and_another_teacher_does_not(
    site: Path, tiny_teacher: Any, teacher_calls: list[str], tmp_path: Path
) -> None:
    from worker.imaging.series_selection import SelectionRules
    from worker.research.teacher_labels import label_studies, read_label

    studies = [site / "study-0", site / "study-1", site / "no-images"]
    first = label_studies(studies, loader=lambda: tiny_teacher, cache_dir=tmp_path, rules=SelectionRules())
    assert len(teacher_calls) == 2 and [s.name for s in first.skipped] == ["no-images"]
    label = read_label(first.labelled[0].cache_file)
    assert label.hemorrhage.dtype == np.float32 and label.hemorrhage.shape == (TINY.n_slices, 48, 48)
    assert label.hemorrhage.min() >= 0.0 and label.hemorrhage.max() <= 1.0
    teacher_calls.clear()
    again = label_studies(studies, loader=lambda: tiny_teacher, cache_dir=tmp_path, rules=SelectionRules())
    assert teacher_calls == [] and again.n_reused == 2
    other = copy.copy(tiny_teacher)  # the same network, other weights' checksum
    other.sha256 = ("f" * 64,)
    label_studies(studies[:1], loader=lambda: other, cache_dir=tmp_path, rules=SelectionRules())
    assert len(teacher_calls) == 1  # new weights: labelled again


def test_an_interrupted_study_leaves_no_cache_file(
    site: Path, tiny_teacher: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.imaging.series_selection import SelectionRules
    from worker.measure import teacher as teacher_module
    from worker.research.teacher_labels import label_studies

    studies = [site / "study-0", site / "study-1"]
    calls = []

    def interrupted(series: Any, teacher: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return teacher_module.TeacherPrediction(  # a plain prediction, fast
            np.zeros((5, *series.hu.shape), np.float32), np.zeros(series.hu.shape, np.uint8), ("t",), ("0",)
        )

    monkeypatch.setattr(teacher_module, "predict_teacher", interrupted)
    with pytest.raises(KeyboardInterrupt):
        label_studies(studies, loader=lambda: tiny_teacher, cache_dir=tmp_path, rules=SelectionRules())
    assert [p.name.split("-")[1] for p in tmp_path.iterdir()] == ["0"]  # study-0 complete, nothing of study-1


def test_too_few_usable_studies_are_refused_in_one_line_and_nothing_is_written(
    site: Path, tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker import cli

    few = tmp_path / "few"
    few.mkdir()
    for name in ("study-1", "study-2", "study-3", "study-4", "no-images"):
        shutil.copytree(site / name, few / name)
    out = tmp_path / "out" / "distilled.keras"
    argv = ["adapt", "--teacher", "blast-ct", str(few), "--out", str(out), "--model", str(tiny_model_path)]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "at least 5 usable studies" in err and "has 4 of 5" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def _spawned_tiny_teacher() -> Any:
    """The tiny teacher built inside a labelling process (module level: the spawned pool imports it)."""
    import hashlib

    from worker.measure.teacher import BlastCtTeacher
    from worker.model import framework
    from worker.model.blast_ct_net import build_blast_ct

    framework.keras().utils.set_random_seed(7)
    sha = hashlib.sha256(b"tiny-teacher-7").hexdigest()
    return BlastCtTeacher.from_keras([build_blast_ct(0.1, input_size=140)], ["tiny-blast-ct"], [sha])


@pytest.mark.slow
def test_labelling_in_a_pool_builds_the_teacher_in_each_process(site: Path, tmp_path: Path) -> None:
    from worker.imaging.series_selection import SelectionRules
    from worker.research.teacher_labels import label_studies, read_label

    studies = [site / "study-0", site / "study-1", site / "no-images"]
    done = label_studies(studies, loader=_spawned_tiny_teacher, cache_dir=tmp_path, rules=SelectionRules(), workers=2)
    assert done.teacher.names == ("tiny-blast-ct",) and [s.name for s in done.skipped] == ["no-images"]
    assert [s.name for s in done.labelled] == ["study-0", "study-1"] and done.n_reused == 0
    for study in done.labelled:
        assert read_label(study.cache_file).hemorrhage.shape == (TINY.n_slices, 48, 48)
