"""Site adaptation (AdaBN): only BatchNorm statistics move, provenance recorded, refusals leave nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.phantom import TINY_SITE_STUDY, write_small_site
from worker.core.errors import ConfigurationError
from worker.model.weights import default_model_path, read_model_info
from worker.research.adaptation import MIN_STUDIES, adapt_model, study_folders

TINY = TINY_SITE_STUDY


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small phantom studies, one in a nested folder, and one folder without any image."""
    return write_small_site(tmp_path_factory.mktemp("site"), nest_first=True)


def _bn_and_other_weights(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from worker.model import framework
    from worker.model.networks import load_keras_model

    keras = framework.keras()
    model = load_keras_model(path)
    stats, others = [], []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            stats += [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
            others += [layer.gamma.numpy(), layer.beta.numpy()]
        else:
            others += [np.asarray(w) for w in layer.get_weights()]
    return stats, others


@pytest.mark.slow
def test_adaptation_moves_only_batchnorm_statistics_and_records_provenance(
    site: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapted.keras"
    report = adapt_model(studies_dir=site, out_path=out, base_model=tiny_model_path)
    assert report.n_studies == 6 and report.n_slices == 6 * TINY.n_slices
    assert [s.name for s in report.skipped] == ["no-images"] and report.skipped[0].code
    base = read_model_info(tiny_model_path)
    info = read_model_info(out)
    assert info.version.startswith(f"{base.version}-adapted-") and len(info.version.rsplit("-", 1)[1]) == 8
    assert info.provenance["base_sha256"] == base.sha256 and info.provenance["method"] == "adabn"
    assert info.provenance["n_studies"] == 6 and info.provenance["n_slices"] == 36
    assert "AdaBN" in info.training_data
    base_stats, base_other = _bn_and_other_weights(tiny_model_path)
    new_stats, new_other = _bn_and_other_weights(out)
    assert all(np.array_equal(a, b) for a, b in zip(base_other, new_other, strict=True))
    # the default adapts the stem alone (MODEL_CARD.md): its statistics move, no later layer's
    assert info.provenance["batchnorm_layers"] == 1 and "the first 1 BatchNorm layer" in info.training_data
    assert not np.allclose(base_stats[0], new_stats[0]) and not np.allclose(base_stats[1], new_stats[1])
    assert all(np.array_equal(a, b) for a, b in zip(base_stats[2:], new_stats[2:], strict=True))
    every = adapt_model(
        studies_dir=site, out_path=tmp_path / "all.keras", base_model=tiny_model_path, batchnorm_layers=None
    )
    all_stats, all_other = _bn_and_other_weights(tmp_path / "all.keras")
    assert every.adapted.provenance["batchnorm_layers"] == "all" and every.adapted.version != info.version
    assert np.allclose(all_stats[0], new_stats[0]), "the stem's statistics do not depend on the layers after it"
    assert sum(not np.allclose(a, b) for a, b in zip(base_stats[2:], all_stats[2:], strict=True)) > len(all_stats) // 2
    assert all(np.array_equal(a, b) for a, b in zip(base_other, all_other, strict=True))
    # Same studies, same base: the same version (the hash names the data, not the run).
    again = adapt_model(studies_dir=site, out_path=tmp_path / "again.keras", base_model=tiny_model_path)
    assert again.adapted.version == info.version


def test_too_few_usable_studies_are_refused_and_nothing_is_written(
    site: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for name in ("study-1", "study-2", "no-images"):
        shutil.copytree(site / name, few / name)
    out = tmp_path / "adapted.keras"
    with pytest.raises(ConfigurationError, match=f"at least {MIN_STUDIES} usable studies.*has 2 of 3.*no-images"):
        adapt_model(studies_dir=few, out_path=out, base_model=tiny_model_path)
    assert not out.exists()


def test_the_default_weights_and_the_base_are_never_overwritten(site: Path, tiny_model_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="would overwrite"):
        adapt_model(studies_dir=site, out_path=default_model_path())
    with pytest.raises(ConfigurationError, match="would overwrite"):
        adapt_model(studies_dir=site, out_path=tiny_model_path, base_model=tiny_model_path)
    with pytest.raises(ConfigurationError, match="is not a folder"):
        study_folders(site / "missing")


def test_the_command_refuses_too_few_studies_in_one_line(
    site: Path, tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker import cli

    few = tmp_path / "few"
    few.mkdir()
    shutil.copytree(site / "study-1", few / "study-1")
    out = tmp_path / "adapted.keras"
    code = cli.main(["adapt", str(few), "--out", str(out), "--model", str(tiny_model_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "at least 5 usable studies" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_the_command_writes_weights_that_segment_loads(
    site: Path, tiny_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker import cli

    out = tmp_path / "adapted.keras"
    argv = ["adapt", str(site), "--out", str(out), "--model", str(tiny_model_path), "--batchnorm-layers", "all"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipped no-images" in printed and "adapted tiny-test-1 to 6 studies" in printed
    assert read_model_info(out).provenance["batchnorm_layers"] == "all"
    with pytest.raises(SystemExit) as bad:
        cli.main([*argv[:-1], "0"])
    assert bad.value.code == 2 and "at least 1 layer" in capsys.readouterr().err
    result = tmp_path / "seg"
    assert cli.main(["segment", str(site / "study-2"), "--out", str(result), "--model", str(out)]) == 0
    assert json.loads((result / "result.json").read_text())["model"]["version"] == read_model_info(out).version


def test_a_site_share_mixes_the_site_statistics_with_the_trained_ones(tiny_model_path: Path) -> None:
    """share 0 restores the trained statistics, 1 keeps the site's, 0.5 is the two-population mixture."""
    from worker.model.networks import load_keras_model
    from worker.research.adaptation import batchnorm_statistics, blend_batchnorm_statistics

    model = load_keras_model(tiny_model_path)
    trained = batchnorm_statistics(model)
    rng = np.random.default_rng(0)
    site = [(m + rng.normal(size=m.shape).astype(np.float32), v * 4.0) for m, v in trained]

    def set_site() -> None:
        from worker.model import framework

        bns = [layer for layer in model.layers if isinstance(layer, framework.keras().layers.BatchNormalization)]
        for layer, (m, v) in zip(bns, site, strict=True):
            layer.moving_mean.assign(m)
            layer.moving_variance.assign(v)

    set_site()
    blend_batchnorm_statistics(model, trained, 1.0)
    assert all(
        np.allclose(a[0], b[0]) and np.allclose(a[1], b[1])
        for a, b in zip(batchnorm_statistics(model), site, strict=True)
    )
    blend_batchnorm_statistics(model, trained, 0.0)
    assert all(
        np.allclose(a[0], b[0]) and np.allclose(a[1], b[1])
        for a, b in zip(batchnorm_statistics(model), trained, strict=True)
    )
    set_site()
    blend_batchnorm_statistics(model, trained, 0.5)
    (m0, v0), (m1, v1), (m, v) = trained[0], site[0], batchnorm_statistics(model)[0]
    assert np.allclose(m, 0.5 * (m0 + m1), atol=1e-5)
    assert np.allclose(v, 0.5 * (v0 + v1) + 0.25 * (m1 - m0) ** 2, rtol=1e-5, atol=1e-6)
    set_site()
    blend_batchnorm_statistics(model, trained, 1.0, layers=2)  # the first two layers adapted, the rest restored
    now = batchnorm_statistics(model)
    assert all(np.allclose(a[0], b[0]) for a, b in zip(now[:2], site[:2], strict=True))
    assert all(
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(now[2:], trained[2:], strict=True)
    )
    with pytest.raises(ConfigurationError, match="between 0 and 1"):
        blend_batchnorm_statistics(model, trained, 1.5)


def test_the_site_share_is_recorded_and_names_its_own_version(
    site: Path, tiny_model_path: Path, tmp_path: Path
) -> None:
    half = adapt_model(studies_dir=site, out_path=tmp_path / "half.keras", base_model=tiny_model_path, site_share=0.5)
    full = adapt_model(studies_dir=site, out_path=tmp_path / "full.keras", base_model=tiny_model_path)
    assert half.adapted.provenance["site_share"] == 0.5 and full.adapted.provenance["site_share"] == 1.0
    assert half.adapted.version != full.adapted.version and "site share 0.5" in half.adapted.training_data
    base_stats, _ = _bn_and_other_weights(tiny_model_path)
    half_stats, _ = _bn_and_other_weights(tmp_path / "half.keras")
    full_stats, _ = _bn_and_other_weights(tmp_path / "full.keras")
    # means: exactly halfway between the trained and the plain-AdaBN ones
    assert np.allclose(half_stats[0], 0.5 * (base_stats[0] + full_stats[0]), atol=1e-5)
    with pytest.raises(ConfigurationError, match="site-share"):
        adapt_model(studies_dir=site, out_path=tmp_path / "x.keras", base_model=tiny_model_path, site_share=0.0)
    assert not (tmp_path / "x.keras").exists()
