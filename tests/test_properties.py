"""Property-based hardening (issue #16): whatever a user or a careless bundle author hands the
runtime — manifest fields, prompt strings with special-token text or undecodable bytes, image
bytes — the outcome is a success or one of the project's errors, never an internal error or a
hang. Every generated case runs under its own wall-clock limit."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from nvlm_export.errors import NvlmError  # noqa: E402
from nvlm_export.runtime.manifest import MANIFEST_NAME  # noqa: E402
from nvlm_export.runtime.pipeline import Pipeline  # noqa: E402

CASE_SECONDS = 20  # far above any legitimate case on the tiny bundle, far below a hang
CASES = settings(
    deadline=None,  # the wall-clock limit below interrupts; hypothesis' deadline only reports
    derandomize=True,  # the same cases in every CI run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


class CaseTimeout(Exception):
    """A generated case ran past CASE_SECONDS: the runtime hung or did unbounded work."""


@contextlib.contextmanager
def time_limit(seconds: float = CASE_SECONDS) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise CaseTimeout(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(function, *args: Any, **kwargs: Any) -> Any:
    """The call's result or the project error it raised; anything else fails the case."""
    with time_limit():
        try:
            return function(*args, **kwargs)
        except NvlmError as error:
            assert "\n" not in error.one_line()
            return error


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle("nvlm-d")[1]


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return Pipeline.load(bundle)


# --- prompt strings ------------------------------------------------------------------------------

SPECIAL_TEXT = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|vision_pad|>",
    "<IMG_CONTEXT>",
    "<img>",
    "</img>",
    "<image>",
    "<Image>",
    "<tile_1>",
    "system\n",
    "<|im_",
    "|>",
]
prompt_text = st.lists(
    st.one_of(
        st.sampled_from(SPECIAL_TEXT),
        st.text(max_size=12),
        st.text(alphabet=string.printable, max_size=12),
        # Undecodable command-line bytes reach Python as lone surrogates (PEP 383).
        st.binary(max_size=6).map(lambda b: b.decode("utf-8", "surrogateescape")),
    ),
    max_size=8,
).map("".join)


@CASES
@given(question=prompt_text, system=st.none() | prompt_text, raw=st.booleans())
def test_any_prompt_text_is_a_prompt_or_a_project_error(
    pipe: Pipeline, question: str, system: str | None, raw: bool
) -> None:
    result = outcome(pipe.prepare, question, system=system, raw=raw)
    if isinstance(result, NvlmError) or raw:
        return
    # User text is data: exactly the template's control tokens, whatever the user typed.
    added = set(pipe.tokenizer.get_added_tokens_decoder())
    controls = [i for i in result.prompt.input_ids.tolist() if i in added]
    template = pipe.prepare("x", system="x").prompt.input_ids.tolist()
    assert controls == [i for i in template if i in added]


@pytest.mark.slow
@settings(CASES, max_examples=30)
@given(question=prompt_text, stop=st.lists(prompt_text.filter(bool), max_size=2))
def test_generation_on_any_prompt_ends_cleanly(
    pipe: Pipeline, question: str, stop: list[str]
) -> None:
    outcome(lambda: pipe.generate(question, max_new_tokens=3, stop=stop).run())


# --- image bytes ---------------------------------------------------------------------------------


def _encoded(format_name: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 240)).save(out, format=format_name)
    return out.getvalue()


VALID_IMAGES = [_encoded(name) for name in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")]


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid image with bytes flipped, cut or appended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=256))
    data = bytearray(draw(st.sampled_from(VALID_IMAGES)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    data = data[: draw(st.integers(0, len(data)))]
    return bytes(data + draw(st.binary(max_size=16)))


@CASES
@given(data=image_bytes())
def test_any_image_bytes_are_an_image_or_an_image_error(pipe: Pipeline, data: bytes) -> None:
    outcome(pipe.prepare, "What is this?", [data])


# --- manifest fields -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, -1, 2, 7, 64, 65, 256, 448, 2**31, 10**12, -(10**12)])
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["/etc/passwd", "../outside", "vision.onnx", "decoder.onnx", ""]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path in a JSON document."""
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _mutated(manifest: dict, path: tuple, action: str, value: Any) -> dict:
    data = json.loads(json.dumps(manifest))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


@pytest.fixture(scope="module")
def manifest_paths(bundle: Path) -> tuple[dict, list[tuple]]:
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    # The file records are many near-identical leaves; one entry for them keeps the cases on the
    # fields that drive work.
    fields = [path for path in _paths(manifest) if path[0] != "files" or len(path) == 2]
    return manifest, fields


@pytest.mark.slow
@settings(CASES, max_examples=120)
@given(choice=st.data())
def test_any_manifest_field_loads_and_runs_or_is_a_bundle_error(
    bundle: Path, manifest_paths: tuple[dict, list[tuple]], tmp_path_factory, choice
) -> None:
    manifest, paths = manifest_paths
    path = choice.draw(st.sampled_from(paths), label="path")
    action = choice.draw(st.sampled_from(["replace", "delete"]), label="action")
    value = choice.draw(json_values, label="value")
    case = tmp_path_factory.mktemp("case")
    for item in bundle.rglob("*"):  # hard links: a cheap copy whose files stay inside the case
        target = case / item.relative_to(bundle)
        if item.is_dir():
            target.mkdir(exist_ok=True)
        elif item.name != MANIFEST_NAME:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(item, target)
    (case / MANIFEST_NAME).write_text(json.dumps(_mutated(manifest, path, action, value)))
    loaded = outcome(Pipeline.load, case)
    if isinstance(loaded, Pipeline):
        answer = outcome(lambda: loaded.generate("What?", max_new_tokens=2).run())
        hypothesis.event(f"loaded, generate: {type(answer).__name__}")
    else:
        hypothesis.event(f"load: {type(loaded).__name__}")
