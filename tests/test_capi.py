"""The C API: a C program linked against libnvlm.so answers exactly like the Python runtime, and
every failure comes back as a status code and a message, never a crash or a leaked session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nvlm_export.capi.options import parse_session_options
from nvlm_export.errors import InputError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "c" / "nvlm_example.c"
QUESTION = "What is shown?"
TOKENS = 12

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None or shutil.which("pkg-config") is None,
    reason="needs a C compiler (cc) and pkg-config to build and link against libnvlm.so",
)

# A test-only C program for the failure paths, kept apart from the user-facing example.
HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nvlm.h"

static void print_live(void) {
    int32_t sessions = -1, requests = -1, results = -1;
    nvlm_debug_live_objects(&sessions, &requests, &results);
    printf("live=%d,%d,%d\n", sessions, requests, results);
}

typedef struct state { int received, limit; nvlm_session* session; const nvlm_request* request;
                       int nested; } state;

static int count_and_cancel(const char* piece, int32_t token_id, void* user_data) {
    (void)piece; (void)token_id;
    state* s = user_data;
    s->received += 1;
    if (s->session && s->received == 1)  /* re-entering the session from its callback */
        s->nested = nvlm_session_generate(s->session, s->request, NULL, NULL, NULL);
    return s->limit > 0 && s->received >= s->limit;
}

static unsigned char* read_all(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
    unsigned char* data = malloc(n); *size = fread(data, 1, n, f); fclose(f);
    return data;
}

int main(int argc, char** argv) {
    const char* mode = argv[1];
    if (strcmp(mode, "open") == 0) {  /* open BUNDLE OPTIONS N: N failing opens */
        int status = 0;
        for (int i = 0; i < atoi(argv[4]); i++) {
            nvlm_session* session = (nvlm_session*)&status;  /* must be reset to NULL */
            status = nvlm_session_open(argv[2], argv[3], &session);
            if (session != NULL) printf("out-param not NULL\n");
            nvlm_session_close(session);
        }
        printf("status=%s\nerror=%s\n", nvlm_status_name(status), nvlm_last_error());
        print_live();
        return 0;
    }
    nvlm_session* session = NULL;
    nvlm_request* request = NULL;
    nvlm_result* result = NULL;
    int status = nvlm_session_open(argv[2], "threads=1", &session);
    if (status != NVLM_OK) {
        printf("open=%s %s\n", nvlm_status_name(status), nvlm_last_error());
        return 1;
    }
    nvlm_request_create(&request);
    nvlm_request_set_prompt(request, "What is shown?");
    nvlm_request_set_max_new_tokens(request, 12);
    if (strcmp(mode, "corrupt") == 0) {  /* corrupt BUNDLE FILE */
        size_t size = 0;
        unsigned char* data = read_all(argv[3], &size);
        status = nvlm_request_add_image_bytes(request, data, size);
        free(data);
        printf("status=%s\nerror=%s\n", nvlm_status_name(status), nvlm_last_error());
        status = nvlm_session_generate(session, request, NULL, NULL, &result);  /* still usable */
        printf("after=%s\n", nvlm_status_name(status));
    } else if (strcmp(mode, "cancel") == 0) {  /* cancel BUNDLE IMAGE N */
        nvlm_request_add_image_file(request, argv[3]);
        state s = {0, atoi(argv[4]), session, request, -1};
        result = (nvlm_result*)&s;  /* must be reset to NULL */
        status = nvlm_session_generate(session, request, count_and_cancel, &s, &result);
        printf("status=%s\npieces=%d\nresult_null=%d\nnested=%s\nerror=%s\n",
               nvlm_status_name(status), s.received, result == NULL, nvlm_status_name(s.nested),
               nvlm_session_last_error(session));
    } else if (strcmp(mode, "loop") == 0) {  /* loop BUNDLE IMAGE N: open/generate/close */
        nvlm_request_add_image_file(request, argv[3]);
        for (int i = 0; i < atoi(argv[4]); i++) {
            nvlm_session* other = NULL;
            nvlm_result* answer = NULL;
            if (nvlm_session_open(argv[2], "", &other) != NVLM_OK ||
                nvlm_session_generate(other, request, NULL, NULL, &answer) != NVLM_OK)
                printf("failed: %s\n", nvlm_last_error());
            else
                printf("text=%s\n", nvlm_result_text(answer));
            nvlm_result_destroy(answer);
            nvlm_session_close(other);
            nvlm_session_close(other);  /* a stale handle is refused, not dereferenced */
        }
        printf("stale=%s\n", nvlm_last_error());
    }
    nvlm_result_destroy(result);
    nvlm_request_destroy(request);
    nvlm_session_close(session);
    print_live();
    return 0;
}
"""


# --- fixtures: one library, one bundle, two programs, built once --------------------------------


@pytest.fixture(scope="module")
def capi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`nvlm-export capi build -o DIR` through the command's own Typer app."""
    pytest.importorskip("cffi", reason="the 'capi' extra (cffi) is not installed")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) to build libnvlm.so")
    from nvlm_export.commands.capi import capi_app

    out = tmp_path_factory.mktemp("capi")
    result = CliRunner().invoke(capi_app, ["build", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle("nvlm-d")[1]


def compile_with_pkgconfig(capi_dir: Path, source: Path, output: Path) -> Path:
    env_path = capi_dir / "lib" / "pkgconfig"
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "nvlm"],
        env={"PKG_CONFIG_PATH": str(env_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    subprocess.run(
        ["cc", "-O1", "-Wall", "-Werror", "-o", str(output), str(source), *flags],
        check=True,
        capture_output=True,
    )
    return output


@pytest.fixture(scope="module")
def example(capi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_with_pkgconfig(
        capi_dir, EXAMPLE, tmp_path_factory.mktemp("example") / "nvlm_example"
    )


@pytest.fixture(scope="module")
def harness(capi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("harness")
    (directory / "harness.c").write_text(HARNESS)
    return compile_with_pkgconfig(capi_dir, directory / "harness.c", directory / "harness")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """An image the tiny model answers differently for when red and blue are swapped; an odd
    width, so row sizes are not multiples of 4."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(301, 421, 3), dtype=np.uint8)
    array[:, :200, 0] = 255
    array[:, 200:, 2] = 0
    return array


def python_answer(bundle: Path, image: np.ndarray) -> str:
    from nvlm_export.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(bundle, intra_op_threads=1)
    return pipeline.generate(QUESTION, [image], max_new_tokens=TOKENS).run().text


def run(program: Path, *args: object) -> subprocess.CompletedProcess[str]:
    # A clean environment: the library must find its Python environment by itself.
    return subprocess.run(
        [str(program), *map(str, args)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def fields(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


# --- the example answers like Python ------------------------------------------------------------


@pytest.mark.slow
@needs_compiler
def test_example_streams_the_python_answer_from_encoded_bytes(
    example: Path, bundle: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    Image.fromarray(pixels).save(tmp_path / "image.png")
    expected = python_answer(bundle, pixels)
    assert "\x00" not in expected  # a C string would end there

    result = run(example, "--max-new-tokens", TOKENS, bundle, tmp_path / "image.png", QUESTION)

    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert f"{TOKENS} tokens ({TOKENS} pieces)" in result.stderr


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize(("order", "pad"), [("rgb", 0), ("bgr", 8)])
def test_example_raw_pixels_with_row_stride(
    example: Path, bundle: Path, pixels: np.ndarray, tmp_path: Path, order: str, pad: int
) -> None:
    """Raw camera-style frames: RGB rows back to back, and BGR rows of an odd 1271-byte stride."""
    Image.fromarray(pixels).save(tmp_path / "image.ppm")
    expected = python_answer(bundle, pixels)
    # Guard: the model tells the channel orders apart, so a wrong swap would fail this test.
    assert python_answer(bundle, pixels[:, :, ::-1].copy()) != expected

    flags = ["--pixels", "--pad", pad] + (["--bgr"] if order == "bgr" else [])
    args = [*flags, "--max-new-tokens", TOKENS, bundle, tmp_path / "image.ppm", QUESTION]
    result = run(example, *args)

    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


# --- failures are status codes ----------------------------------------------------------------


@needs_compiler
def test_missing_bundle_is_an_error_code_and_leaks_nothing(harness: Path, tmp_path: Path) -> None:
    result = run(harness, "open", tmp_path / "no-such-bundle", "", 20)
    out = fields(result.stdout)
    assert result.returncode == 0, result.stderr
    assert "out-param not NULL" not in result.stdout
    assert out["status"] == "NVLM_ERR_BUNDLE"
    assert "does not exist" in out["error"]
    assert out["live"] == "0,0,0"


@needs_compiler
def test_unknown_session_option_is_refused(harness: Path, bundle: Path) -> None:
    out = fields(run(harness, "open", bundle, "threads=1;colour=red", 1).stdout)
    assert out["status"] == "NVLM_ERR_INVALID_ARGUMENT"
    assert "Unknown session option 'colour'" in out["error"]
    assert out["live"] == "0,0,0"


@pytest.mark.slow
@needs_compiler
def test_corrupt_image_is_refused_and_the_session_stays_usable(
    harness: Path, bundle: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    Image.fromarray(pixels).save(tmp_path / "image.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "image.png").read_bytes()[:500])

    result = run(harness, "corrupt", bundle, truncated)
    out = fields(result.stdout)
    assert result.returncode == 0, result.stderr
    assert out["status"] == "NVLM_ERR_IMAGE"
    assert "truncated or corrupt" in out["error"]
    assert out["after"] == "NVLM_OK"
    assert out["live"] == "0,0,0"


@pytest.mark.slow
@needs_compiler
def test_callback_cancels_after_three_tokens(
    harness: Path, bundle: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    Image.fromarray(pixels).save(tmp_path / "image.png")
    result = run(harness, "cancel", bundle, tmp_path / "image.png", 3)
    out = fields(result.stdout)
    assert result.returncode == 0, result.stderr
    assert out["status"] == "NVLM_ERR_CANCELLED"
    assert out["pieces"] == "3"
    assert out["result_null"] == "1"
    assert "cancelled by the token callback" in out["error"]
    # Generating on the session from inside its own callback is refused, not deadlocked.
    assert out["nested"] == "NVLM_ERR_INVALID_ARGUMENT"
    assert out["live"] == "0,0,0"


@pytest.mark.slow
@needs_compiler
def test_open_generate_close_loop_frees_every_object(
    harness: Path, bundle: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    Image.fromarray(pixels).save(tmp_path / "image.png")
    result = run(harness, "loop", bundle, tmp_path / "image.png", 3)
    out = fields(result.stdout)
    assert result.returncode == 0, result.stderr
    texts = [line for line in result.stdout.splitlines() if line.startswith("text=")]
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy: the same answer every time
    assert "nvlm_session handle is not valid" in out["stale"]
    assert out["live"] == "0,0,0"


# --- Python-side units (no compiler needed) ------------------------------------------------------


def test_session_options_parse_into_pipeline_keywords() -> None:
    backend, keywords = parse_session_options("threads=2; providers=A,B ;")
    assert backend == "onnxruntime"
    assert keywords == {"intra_op_threads": 2, "providers": ("A", "B")}
    assert parse_session_options(None) == ("onnxruntime", {})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("threads=0", "threads=0 is invalid"),
        ("threads", "not key=value"),
        ("colour=red", "Unknown session option"),
        ("backend=tensorrt;threads=2", "does not apply to the 'tensorrt' backend"),
        ("threads=1;threads=2", "given twice"),
    ],
)
def test_bad_session_options_are_refused(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_session_options(text)


def test_pixels_to_array_skips_row_padding_and_reorders_channels() -> None:
    cffi = pytest.importorskip("cffi", reason="the 'capi' extra (cffi) is not installed")
    from nvlm_export.capi.embedded import pixels_to_array

    ffi = cffi.FFI()
    rgb = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    stride = 5 * 3 + 4
    padded = np.full((3, stride), 99, dtype=np.uint8)
    padded[:, :15] = rgb[:, :, ::-1].reshape(3, 15)  # BGR rows, then 4 bytes of padding
    buffer = ffi.from_buffer(padded.tobytes()[: stride * 2 + 15])  # last row unpadded

    array = pixels_to_array(ffi, buffer, 5, 3, stride, 1)  # NVLM_PIXEL_BGR

    np.testing.assert_array_equal(array, rgb)
