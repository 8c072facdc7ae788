"""`build`: checkpoint -> export -> calibrate -> quantize, resumable, checked before any work."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import quiet

from nvlm_export.errors import InputError, MissingExtraError
from nvlm_export.export import bundle as bundle_module
from nvlm_export.export import quantize as quantize_module
from nvlm_export.export.build import STATE_FILE, BuildSettings, build, work_directory
from nvlm_export.export.engine_build import installed_tensorrt_version
from nvlm_export.runtime.manifest import load_manifest
from nvlm_export.runtime.pipeline import Pipeline

HAS_TENSORRT = installed_tensorrt_version() is not None


def settings(precision: str = "int8", **kwargs: object) -> BuildSettings:
    # Budget checks are covered by test_quantize; here a flat-logit tiny model must not flake.
    base: dict[str, object] = dict(
        max_samples=1,
        decode_steps=1,
        max_tiles=6,
        accuracy_requests=1,
        accuracy_steps=4,
        force=True,
    )
    return BuildSettings.of(precision, **{**base, **kwargs})


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("nvlm-d")


@pytest.mark.slow
def test_interrupted_build_resumes_and_finished_stages_are_not_redone(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bundle-int8"

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(quantize_module, "quantize_bundle", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build(checkpoint, out, settings(), quiet=True, warn=quiet)
    assert not out.exists()
    state = json.loads((work_directory(out) / STATE_FILE).read_text())["stages"]
    assert sorted(state) == ["calibrate", "export"]

    report = build(checkpoint, out, settings(), quiet=True, warn=quiet)
    assert (report.ran, report.skipped) == (["quantize"], ["export", "calibrate"])
    assert load_manifest(out).precision == "int8"
    assert report.accuracy is not None and report.bundle_bytes > 0
    assert report.work_bytes > 0  # the summary names what is kept beside the bundle

    again = build(checkpoint, out, settings(target="orin"), quiet=True, warn=quiet)
    assert (again.ran, again.skipped) == ([], ["export", "calibrate", "quantize"])
    assert any(f"nvlm-export engine {out} --target orin" in note for note in again.notes)

    changed = build(checkpoint, out, settings(exclude=("*mlp.down_proj",)), quiet=True, warn=quiet)
    assert (changed.ran, changed.skipped) == (["quantize"], ["export", "calibrate"])


@pytest.mark.slow
def test_int4_weight_only_build_never_runs_the_model_and_says_it_is_unchecked(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def runs_the_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a weight-only build ran the model")

    monkeypatch.setattr(bundle_module, "validate_bundle", runs_the_model)
    monkeypatch.setattr(quantize_module, "measure_accuracy", runs_the_model)
    warnings: list[str] = []
    out = tmp_path / "bundle-int4"
    weight_only = settings(precision="int4", validate=False, check_accuracy=False)
    report = build(checkpoint, out, weight_only, quiet=True, warn=warnings.append)
    assert report.ran == ["export", "quantize"] and report.accuracy is None
    assert load_manifest(out).precision == "int4" and not (out / "accuracy.json").exists()
    assert [w.split(" (")[0].split(":")[0] for w in warnings] == [
        "export not validated",
        "vision kept in fp32",  # its INT8 ranges would need the model to run
        "accuracy not checked",
    ]
    assert load_manifest(out).graph("vision").precision == "fp32"
    tokens = Pipeline.load(out).generate("Hi", max_new_tokens=2).run().token_ids
    assert len(tokens) >= 1


def test_target_and_precision_are_checked_before_any_work(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle-fp8"
    with pytest.raises(InputError, match="cannot run FP8"):
        build(checkpoint, out, settings(precision="fp8", target="orin"), quiet=True)
    assert not work_directory(out).exists() and not out.exists()
    with pytest.raises(InputError, match="Unknown precision"):
        settings(precision="int2")
    out = tmp_path / "bundle-int4"
    with pytest.raises(InputError, match="opset 21"):
        build(checkpoint, out, settings(precision="int4", target="thor"), quiet=True)
    assert not work_directory(out).exists() and not out.exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed")
def test_engines_asked_for_where_tensorrt_is_missing_are_refused_before_any_work(
    checkpoint: Path, tmp_path: Path
) -> None:
    """`--backend tensorrt` means engines built here: without TensorRT the build would end, after
    hours on a large model, with no engines and a success exit."""
    out = tmp_path / "bundle-int8"
    with pytest.raises(MissingExtraError, match="which has no TensorRT") as refused:
        build(checkpoint, out, settings(backend="tensorrt", target="h100"), quiet=True)
    assert f"nvlm-export engine {out} --target h100" in str(refused.value)
    assert not work_directory(out).exists() and not out.exists()


def test_build_refuses_to_overwrite_a_foreign_bundle(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a bundle"):
        build(checkpoint, out, settings(), quiet=True)


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        ([], "Accuracy: top-1 0.750; KL 0.0100; passed True"),
        (
            [{"graph": "vision", "min_cosine": 0.99871}],
            "Accuracy: vision cosine 0.9987; top-1 0.750; KL 0.0100; passed True",
        ),
    ],
    ids=["nothing-compared", "vision-compared"],
)
def test_build_summary_names_each_compared_graph(
    outputs: list[dict], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """INT4 leaves vision unchanged, so nothing but the decoder is compared: the summary line
    must still read well."""
    from nvlm_export.commands.quantize import _print_build_summary
    from nvlm_export.export.build import BuildReport

    accuracy = {
        "outputs": outputs,
        "decoder": {"top1_agreement": 0.75, "mean_kl": 0.01},
        "passed": True,
    }
    _print_build_summary(BuildReport(Path("b"), Path("w"), accuracy=accuracy))
    assert expected in capsys.readouterr().out.splitlines()
