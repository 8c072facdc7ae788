"""`--backend` on `run`, `chat` and `profile`: one declaration, each runner's own knobs, a
backend per graph ("vision=openvino"), and a backend whose package is missing is one line naming
the extra to install."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny import TinyBundle
from PIL import Image
from typer.testing import CliRunner

from nvlm_export.cli import app
from nvlm_export.commands.options import runner_options
from nvlm_export.errors import InputError
from nvlm_export.runtime import backends
from nvlm_export.runtime.backends import BackendChoice
from nvlm_export.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def bundle(tiny_bundle: TinyBundle) -> Path:
    return tiny_bundle("internvl")[1]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "a.png"
    pixels = (np.random.default_rng(4).random((120, 200, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def invoke(args: list[str], stdin: str = "") -> tuple[int, str]:
    result = CliRunner().invoke(app, args, input=stdin)
    return result.exit_code, result.output


def commands(bundle: Path, image: Path) -> dict[str, tuple[list[str], str]]:
    """Each command that takes --backend, as (arguments, stdin)."""
    return {
        "run": (["run", str(bundle), "-i", str(image), "-p", "What is it?", "-n", "3"], ""),
        "chat": (["chat", str(bundle), "-i", str(image), "-n", "3"], "What is it?\n"),
        "profile": (["profile", str(bundle), "--tiles", "1", "--runs", "1", "--warmup", "0"], ""),
    }


@pytest.mark.parametrize("command", ["run", "chat", "profile"])
def test_a_backend_whose_package_is_missing_is_one_line_naming_the_extra(
    bundle: Path, image: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # absent, whether installed or not
    args, stdin = commands(bundle, image)[command]
    code, output = invoke([*args, "--backend", "openvino"], stdin)
    assert code == 3  # MissingExtraError
    assert "The 'openvino' backend needs OpenVINO" in output
    assert "pip install 'nvlm-export[openvino]'" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("command", ["run", "chat"])
def test_an_unknown_backend_lists_the_known_ones(bundle: Path, image: Path, command: str) -> None:
    args, stdin = commands(bundle, image)[command]
    code, output = invoke([*args, "--backend", "onnx"], stdin)
    assert code != 0
    assert "Unknown backend 'onnx'" in output
    assert "onnxruntime, openvino, tensorrt" in output


def test_a_knob_the_backend_does_not_have_is_refused(bundle: Path, image: Path) -> None:
    args, _ = commands(bundle, image)["run"]
    code, output = invoke([*args, "--backend", "tensorrt", "--threads", "2"])
    assert code != 0
    assert "--threads does not apply to the 'tensorrt' backend" in output


def test_runner_options_are_given_only_when_set() -> None:
    assert runner_options("onnxruntime", None, True) == {}  # each runner keeps its defaults
    assert runner_options("onnxruntime", 2, False) == {
        "intra_op_threads": 2,
        "allow_spinning": False,
    }
    assert runner_options("openvino", 2, True) == {"intra_op_threads": 2}
    assert runner_options("tensorrt", None, True) == {}
    with pytest.raises(InputError, match="--no-spin does not apply to the 'tensorrt' backend"):
        runner_options("tensorrt", None, False)
    # OpenVINO's CPU plugin schedules its own threads: there is nothing for --no-spin to change.
    with pytest.raises(InputError, match="--no-spin does not apply to the 'openvino' backend"):
        runner_options("openvino", None, False)


def test_run_on_openvino_answers_as_the_openvino_pipeline(bundle: Path, image: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    pipe = Pipeline.load(bundle, backend="openvino", intra_op_threads=1)
    expected = pipe.generate("What is it?", [image], max_new_tokens=3).run().token_ids
    args, _ = commands(bundle, image)["run"]
    code, output = invoke([*args, "--backend", "openvino", "--threads", "1", "--json"])
    assert code == 0, output
    assert json.loads(output[output.index("{") :])["token_ids"] == list(expected)


@pytest.mark.parametrize(
    ("written", "vision", "decoder", "canonical"),
    [
        ("openvino", "openvino", "openvino", "openvino"),
        ("vision=openvino", "openvino", "onnxruntime", "onnxruntime,vision=openvino"),
        (
            " onnxruntime , vision=openvino",
            "openvino",
            "onnxruntime",
            "onnxruntime,vision=openvino",
        ),
        ("openvino,decoder=onnxruntime", "openvino", "onnxruntime", "openvino,decoder=onnxruntime"),
    ],
)
def test_a_backend_choice_names_each_graphs_backend(
    written: str, vision: str, decoder: str, canonical: str
) -> None:
    choice = BackendChoice.parse(written)
    assert (choice.for_graph("vision"), choice.for_graph("decoder")) == (vision, decoder)
    assert str(choice) == canonical
    assert BackendChoice.parse(canonical) == choice
    assert BackendChoice.of({"vision": "openvino"}) == BackendChoice.parse("vision=openvino")


def test_prefill_follows_the_decoder_unless_named() -> None:
    """A choice may name "prefill", the decoder's prompt calls; unnamed, they go with it."""
    assert BackendChoice.parse("decoder=openvino").for_graph("prefill") == "openvino"
    assert not BackendChoice.parse("openvino,vision=onnxruntime").prefill_apart
    apart = BackendChoice.parse("prefill=openvino")
    assert (apart.for_graph("decoder"), apart.for_graph("prefill")) == ("onnxruntime", "openvino")
    assert apart.prefill_apart and str(apart) == "onnxruntime,prefill=openvino"
    # Described from loaded runners, prefill is named exactly when it has a runner of its own.
    runners = {"vision": "openvino", "decoder": "onnxruntime", "prefill": "openvino"}
    described = BackendChoice.of_runners(runners)
    assert {g: described.for_graph(g) for g in runners} == runners
    assert BackendChoice.parse(str(described)) == described
    assert not BackendChoice.of_runners({"vision": "openvino", "decoder": "openvino"}).prefill_apart


@pytest.mark.parametrize(
    ("written", "message"),
    [
        (
            "visoin=openvino",
            "Unknown graph 'visoin' in backend choice 'visoin=openvino'. "
            "Choose graphs from: vision, decoder, cross_kv",
        ),
        (
            "vision=onnx",
            "Unknown backend 'onnx'. Choose one of: auto, onnxruntime, openvino, tensorrt",
        ),
        (
            "onnxruntime,openvino",
            "Backend choice 'onnxruntime,openvino' is not a backend or graph=backend pairs",
        ),
        ("vision=", "e.g. onnxruntime,vision=openvino"),
        (
            "vision=openvino,vision=onnxruntime",
            "names the vision graph twice. Name each graph once",
        ),
    ],
)
def test_a_bad_backend_choice_is_one_line_naming_the_valid_ones(
    bundle: Path, image: Path, written: str, message: str
) -> None:
    args, _ = commands(bundle, image)["run"]
    code, output = invoke([*args, "--backend", written])
    assert code != 0
    assert message in " ".join(output.split())  # the console may wrap the line
    assert "Traceback" not in output


def test_a_runner_flag_reaches_the_graphs_whose_backend_has_it() -> None:
    # --no-spin is ONNX Runtime's: with vision on OpenVINO it still applies to the decoder.
    assert runner_options("vision=openvino", 2, False) == {
        "intra_op_threads": 2,
        "allow_spinning": False,
    }
    with pytest.raises(
        InputError, match="--no-spin does not apply to the 'tensorrt' or 'openvino' backends"
    ):
        runner_options("tensorrt,vision=openvino", None, False)


def test_a_choice_naming_a_graph_the_bundle_has_not_is_refused(bundle: Path) -> None:
    with pytest.raises(InputError, match="names the cross_kv graph, which this bundle has not"):
        Pipeline.load(bundle, backend="cross_kv=openvino")


def test_an_option_no_chosen_runner_takes_is_refused_before_loading(bundle: Path) -> None:
    with pytest.raises(InputError, match="allow_spinning does not apply to the 'tensorrt'"):
        Pipeline.load(bundle, backend="tensorrt", allow_spinning=False)


def test_run_with_vision_on_openvino_answers_as_onnxruntime_alone(
    bundle: Path, image: Path
) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    expected = Pipeline.load(bundle).generate("What is it?", [image], max_new_tokens=3).run()
    args, _ = commands(bundle, image)["run"]
    code, output = invoke([*args, "--backend", "vision=openvino", "--no-spin", "--json"])
    assert code == 0, output
    assert json.loads(output[output.index("{") :])["token_ids"] == list(expected.token_ids)


def test_profile_names_the_backend_of_each_graph(bundle: Path, image: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    args, _ = commands(bundle, image)["profile"]
    code, output = invoke([*args, "--new-tokens", "2", "--backend", "vision=openvino", "--json"])
    assert code == 0, output
    assert json.loads(output[output.index("{") :])["backend"] == "onnxruntime,vision=openvino"


# --- "auto": the measured fastest backend per graph, where its library is installed ------------


@pytest.fixture
def amx_machine_with_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with AMX and the openvino package importable, whatever this machine has."""
    fake = types.ModuleType("openvino")
    fake.__spec__ = importlib.machinery.ModuleSpec("openvino", None)
    monkeypatch.setitem(sys.modules, "openvino", fake)
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"avx512f", "amx_int8"}))


INT8_VISION = {"vision": "int8", "decoder": "int8"}


def test_auto_runs_an_int8_vision_graph_on_openvino_on_a_cpu_with_amx(
    amx_machine_with_openvino: None,
) -> None:
    resolved = BackendChoice.parse("auto").resolve(INT8_VISION)
    assert str(resolved) == "onnxruntime,vision=openvino"
    # An INT4 bundle's vision graph is INT8 too, and its decoder's prompt calls go to OpenVINO
    # (its one-token steps stay); a float vision graph stays on ONNX Runtime.
    int4 = {"vision": "int8", "decoder": "int4"}
    assert str(BackendChoice.parse("auto").resolve(int4)) == (
        "onnxruntime,prefill=openvino,vision=openvino"
    )
    assert str(BackendChoice.parse("auto,prefill=onnxruntime").resolve(int4)) == (
        "onnxruntime,vision=openvino"
    )
    assert str(BackendChoice.parse("auto").resolve({"vision": "fp32", "decoder": "fp32"})) == (
        "onnxruntime"
    )


def test_auto_stays_on_onnxruntime_without_the_library_or_the_matrix_units(
    amx_machine_with_openvino: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"avx512f", "avx512_vnni"}))
    assert str(BackendChoice.parse("auto").resolve(INT8_VISION)) == "onnxruntime"
    monkeypatch.setattr(backends, "cpu_flags", lambda: frozenset({"amx_int8"}))
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    assert str(BackendChoice.parse("auto").resolve(INT8_VISION)) == "onnxruntime"


def test_a_named_backend_is_kept_and_auto_can_be_named_per_graph(
    amx_machine_with_openvino: None,
) -> None:
    assert str(BackendChoice.parse("onnxruntime").resolve(INT8_VISION)) == "onnxruntime"
    resolved = BackendChoice.parse("tensorrt,vision=auto").resolve(INT8_VISION)
    assert (resolved.for_graph("vision"), resolved.for_graph("decoder")) == (
        "openvino",
        "tensorrt",
    )


def test_run_reports_the_backend_auto_chose_for_each_graph(bundle: Path, image: Path) -> None:
    """The default is auto; the tiny float bundle stays on ONNX Runtime on any machine."""
    args, _ = commands(bundle, image)["run"]
    code, output = invoke([*args, "--json"])
    assert code == 0, output
    assert json.loads(output[output.index("{") :])["backends"] == "onnxruntime"


def test_a_hostile_backend_choice_is_refused_in_one_escaped_line(bundle: Path, image: Path) -> None:
    """--backend comes from scripts and users: terminal escapes and line breaks in it are shown
    escaped, in one line, and nothing is loaded."""
    args, _ = commands(bundle, image)["run"]
    code, output = invoke([*args, "--backend", "vision=auto\x1b[2J\nrm -rf /"])
    assert code != 0
    assert "\x1b" not in output and "\\x1b[2J\\nrm -rf /" in " ".join(output.split())
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        ("prefill=openvino\x1b]0;pwned\x07", "Unknown backend 'openvino\\x1b]0;pwned\\x07'"),
        ("prefill=openvino,prefill=onnxruntime", "names the prefill graph twice"),
        ("prefill=auto\r\nvision=openvino", "\\r\\nvision"),
    ],
)
def test_a_hostile_prefill_choice_is_refused_in_one_escaped_line(
    bundle: Path, image: Path, written: str, shown: str
) -> None:
    """A choice may name "prefill" besides the graphs: the backend after it is checked
    like any backend name, shown escaped, and refused before anything loads."""
    args, _ = commands(bundle, image)["run"]
    code, output = invoke([*args, "--backend", written])
    assert code != 0
    assert "\x1b" not in output and "\x07" not in output and "\r" not in output
    assert shown in " ".join(output.split())
    assert "Traceback" not in output
