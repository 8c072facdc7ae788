"""The C API: a C program linked against libnvlm.so answers exactly like the Python runtime, and
every failure comes back as a status code and a message, never a crash or a leaked session."""

from __future__ import annotations

import re
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
CHAT_EXAMPLE = REPO / "examples" / "c" / "nvlm_chat_example.c"
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

static void print_ids(const char* label, const nvlm_result* result) {
    size_t count = 0;
    const int32_t* ids = nvlm_result_token_ids(result, &count);
    printf("%s=", label);
    for (size_t i = 0; i < count; i++) printf(i ? ",%d" : "%d", ids[i]);
    printf("\n");
}

static void print_length(const char* label, const nvlm_chat* chat) {
    int32_t turns = -1, tokens = -1;
    nvlm_chat_get_length(chat, &turns, &tokens);
    printf("%s_turns=%d\n%s_tokens=%d\n", label, turns, label, tokens);
}

/* chat BUNDLE IMAGE N: a turn about the image, a follow-up cancelled after N tokens, a third. */
static int run_chat(nvlm_session* session, const char* image, int cancel_at) {
    const char* questions[3] = {"What is shown?", "Tell me a long story about it.", "Why?"};
    nvlm_chat* chat = NULL;
    /* Hostile creates: each refused with a status and a message, no chat made. */
    int status = nvlm_chat_create(session, NULL, -1, &chat);
    printf("bad_tiles=%s %s\n", nvlm_status_name(status), nvlm_last_error());
    status = nvlm_chat_create(session, "\xff\xfe system", 0, &chat);
    printf("bad_system=%s %s\n", nvlm_status_name(status), nvlm_last_error());
    status = nvlm_chat_create(session, NULL, 0, NULL);
    printf("null_out=%s\n", nvlm_status_name(status));
    printf("hostile_chat=%s\n", chat == NULL ? "none" : "made");
    status = nvlm_chat_create(session, NULL, 0, &chat);
    printf("create=%s\n", nvlm_status_name(status));
    for (int turn = 1; turn <= 3; turn++) {
        nvlm_request* request = NULL;
        nvlm_result* result = NULL;
        nvlm_request_create(&request);
        nvlm_request_set_prompt(request, questions[turn - 1]);
        nvlm_request_set_max_new_tokens(request, 12);
        if (turn == 1) nvlm_request_add_image_file(request, image);
        state s = {0, turn == 2 ? cancel_at : 0, NULL, NULL, -1};
        status = nvlm_chat_ask(chat, request, count_and_cancel, &s, &result);
        printf("turn%d=%s\nturn%d_pieces=%d\n", turn, nvlm_status_name(status), turn, s.received);
        if (result != NULL) {
            char label[32];
            snprintf(label, sizeof label, "turn%d_ids", turn);
            print_ids(label, result);
            printf("turn%d_prompt=%d\nturn%d_reused=%d\n", turn,
                   nvlm_result_prompt_tokens(result), turn, nvlm_result_reused_tokens(result));
        }
        char label[32];
        snprintf(label, sizeof label, "after%d", turn);
        print_length(label, chat);
        nvlm_result_destroy(result);
        nvlm_request_destroy(request);
    }
    /* The chat's settings are its own: a turn's request may not set them. */
    nvlm_request* raw = NULL;
    nvlm_request_create(&raw);
    nvlm_request_set_prompt(raw, "hi");
    nvlm_request_set_system(raw, "Be brief.");
    status = nvlm_chat_ask(chat, raw, NULL, NULL, NULL); /* before reading the error */
    printf("system=%s %s\n", nvlm_status_name(status), nvlm_last_error());
    nvlm_request_destroy(raw);
    /* A chat outliving its session refuses to ask, and is still destroyed. */
    nvlm_session_close(session);
    nvlm_request* late = NULL;
    nvlm_request_create(&late);
    nvlm_request_set_prompt(late, "Still there?");
    status = nvlm_chat_ask(chat, late, NULL, NULL, NULL);
    printf("closed=%s %s\n", nvlm_status_name(status), nvlm_last_error());
    nvlm_request_destroy(late);
    nvlm_chat_destroy(chat);
    nvlm_chat_destroy(chat); /* a stale handle is refused, not dereferenced */
    int32_t chats = -1;
    nvlm_debug_live_chats(&chats);
    printf("live_chats=%d\n", chats);
    print_live();
    return 0;
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
    if (strcmp(mode, "chat") == 0) return run_chat(session, argv[3], atoi(argv[4]));
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
def chat_example(capi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_with_pkgconfig(
        capi_dir, CHAT_EXAMPLE, tmp_path_factory.mktemp("chat_example") / "nvlm_chat_example"
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


def run(program: Path, *args: object, stdin: str = "") -> subprocess.CompletedProcess[str]:
    # A clean environment: the library must find its Python environment by itself.
    return subprocess.run(
        [str(program), *map(str, args)],
        env={"PATH": "/usr/bin:/bin"},
        input=stdin,
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


CHAT_QUESTIONS = ("What is shown?", "Why?", "And then?")
TURN_LINE = re.compile(r"\[turn (\d+): (\d+) prompt tokens, (\d+) reused")


def python_conversation(bundle: Path, image: Path, questions: tuple[str, ...]) -> list[str]:
    """The answers of `Pipeline.chat()` to `questions`, the image joining the first."""
    from nvlm_export.runtime.pipeline import Pipeline

    chat = Pipeline.load(bundle, intra_op_threads=1).chat()
    images = [image]
    answers = []
    for question in questions:
        answers.append(chat.ask(question, images, max_new_tokens=TOKENS).run().text)
        images = []
    return answers


@pytest.mark.slow
@needs_compiler
def test_chat_example_streams_the_python_conversation_reusing_earlier_turns(
    chat_example: Path, bundle: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    """Three questions about one image, as arguments: each answer is Pipeline.chat()'s, and each
    follow-up prefills only its own tokens."""
    image = tmp_path / "image.png"
    Image.fromarray(pixels).save(image)
    expected = python_conversation(bundle, image, CHAT_QUESTIONS)

    result = run(chat_example, "--max-new-tokens", TOKENS, bundle, image, *CHAT_QUESTIONS)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(answer + "\n" for answer in expected)
    turns = [tuple(map(int, found)) for found in TURN_LINE.findall(result.stderr)]
    assert [number for number, _, _ in turns] == [1, 2, 3]
    prompts, reused = [turn[1] for turn in turns], [turn[2] for turn in turns]
    assert reused[0] == 0
    for n in (1, 2):  # the turns before a follow-up are not prefilled again
        assert prompts[n - 1] <= reused[n] < prompts[n]
    assert "[conversation: 3 turns" in result.stderr


@pytest.mark.slow
@needs_compiler
def test_chat_example_reads_stdin_and_resets(
    chat_example: Path, bundle: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    """Questions one per line on stdin; after /reset the image joins the next question again, so
    the same first question gets the same answer."""
    image = tmp_path / "image.png"
    Image.fromarray(pixels).save(image)
    (first,) = python_conversation(bundle, image, CHAT_QUESTIONS[:1])

    stdin = f"{CHAT_QUESTIONS[0]}\n\n/reset\n{CHAT_QUESTIONS[0]}\n"
    result = run(chat_example, "--max-new-tokens", TOKENS, bundle, image, stdin=stdin)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{first}\n{first}\n"
    assert "[new conversation]" in result.stderr
    assert "[conversation: 1 turns" in result.stderr


@needs_compiler
def test_chat_example_missing_image_is_one_error_line_and_its_status(
    chat_example: Path, bundle: Path, tmp_path: Path
) -> None:
    result = run(chat_example, bundle, tmp_path / "no-such.png", "What is shown?")
    assert result.returncode == 3  # NVLM_ERR_IMAGE
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: building the turn failed (NVLM_ERR_IMAGE): ")
    assert result.stdout == ""


@needs_compiler
def test_chat_example_refuses_a_stdin_line_longer_than_its_buffer(
    chat_example: Path, bundle: Path, tmp_path: Path
) -> None:
    """Not split into two questions the user never asked."""
    image = tmp_path / "no-such.png"  # never reached: the line is refused before the turn
    result = run(chat_example, bundle, image, stdin="a" * 5000 + "\nWhat is shown?\n")
    assert result.returncode == 1  # NVLM_ERR_INVALID_ARGUMENT
    (line,) = result.stderr.strip().splitlines()
    assert line == "error: a question on stdin is longer than 4095 bytes"
    assert result.stdout == ""


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
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("threads=1;colour=red", "Unknown session option 'colour'"),
        (
            "backend=auto,speech=openvino;threads=1",
            "Unknown graph 'speech' in backend choice 'auto,speech=openvino'",
        ),
    ],
)
def test_bad_session_options_are_an_error_code(
    harness: Path, bundle: Path, options: str, message: str
) -> None:
    out = fields(run(harness, "open", bundle, options, 1).stdout)
    assert out["status"] == "NVLM_ERR_INVALID_ARGUMENT"
    assert message in out["error"]
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


@pytest.mark.slow
@needs_compiler
def test_chat_from_c_cancelled_turn_is_dropped_and_the_next_sees_the_first(
    harness: Path, bundle: Path, pixels: np.ndarray, tmp_path: Path
) -> None:
    """A 2-turn chat from C, cancelled in the middle of turn 2, then turn 3: turn 3 answers
    exactly as a conversation of turns 1 and 3 (the cancelled turn is dropped from the history),
    reusing turn 1's keys/values, and no object is left live."""
    from nvlm_export.runtime.pipeline import Pipeline

    Image.fromarray(pixels).save(tmp_path / "image.png")
    result = run(harness, "chat", bundle, tmp_path / "image.png", 3)
    out = fields(result.stdout)
    assert result.returncode == 0, result.stderr

    pipe = Pipeline.load(bundle, intra_op_threads=1, feature_cache_bytes=0, prefix_cache_bytes=0)
    chat = pipe.chat()
    first = chat.ask("What is shown?", [tmp_path / "image.png"], max_new_tokens=TOKENS).run()
    third = chat.ask("Why?", max_new_tokens=TOKENS)  # right after turn 1
    expected = [first.token_ids, third.run().token_ids]

    assert out["bad_tiles"].startswith("NVLM_ERR_INVALID_ARGUMENT max_tiles -1 is invalid")
    assert out["bad_system"].startswith("NVLM_ERR_INVALID_ARGUMENT")
    assert out["null_out"] == "NVLM_ERR_INVALID_ARGUMENT"
    assert out["hostile_chat"] == "none"
    assert (out["create"], out["turn1"], out["turn3"]) == ("NVLM_OK",) * 3
    assert out["turn1_ids"] == ",".join(map(str, expected[0]))
    assert (out["turn2"], out["turn2_pieces"]) == ("NVLM_ERR_CANCELLED", "3")
    assert "turn2_ids" not in out  # no result for a cancelled turn
    assert (out["after1_turns"], out["after2_turns"], out["after3_turns"]) == ("1", "1", "2")
    assert out["after2_tokens"] == out["after1_tokens"]  # the cancelled turn left nothing
    assert out["turn3_ids"] == ",".join(map(str, expected[1]))
    assert int(out["turn3_prompt"]) == third.prepared.prompt.num_tokens
    assert int(out["turn3_reused"]) >= int(out["turn1_prompt"])  # turn 1 is not prefilled again
    assert out["system"].startswith("NVLM_ERR_INVALID_ARGUMENT A chat turn's request sets system")
    assert out["closed"].startswith("NVLM_ERR_INVALID_ARGUMENT The chat's session is closed")
    assert out["live_chats"] == "0"
    assert out["live"] == "0,0,0"


# --- Python-side units (no compiler needed) ------------------------------------------------------


def test_session_options_parse_into_pipeline_keywords() -> None:
    backend, keywords = parse_session_options("threads=2; providers=A,B ;")
    assert str(backend) == "onnxruntime"
    assert keywords == {"intra_op_threads": 2, "providers": ("A", "B")}
    # An embedded session runs where its options say: ONNX Runtime unless they ask for "auto".
    assert str(parse_session_options(None)[0]) == "onnxruntime"
    # Pipeline options apply whatever the backend.
    backend, keywords = parse_session_options(
        "backend=openvino;verify_hashes=1;feature_cache_bytes=0"
    )
    assert (str(backend), keywords) == (
        "openvino",
        {"verify_hashes": True, "feature_cache_bytes": 0},
    )


def test_session_backend_is_a_choice_per_graph_as_the_cli_writes_it() -> None:
    """An embedder reaches what `--backend` does: "auto", a graph elsewhere, the decoder's prompt
    calls on a backend of their own; runner options go to the runners that take them."""
    backend, keywords = parse_session_options("backend=auto,prefill=openvino;threads=2")
    assert str(backend) == "auto,prefill=openvino"
    assert backend.for_graph("prefill") == "openvino"
    assert keywords == {"intra_op_threads": 2}
    backend, _ = parse_session_options("backend=onnxruntime,vision=openvino")
    assert (backend.for_graph("vision"), backend.for_graph("decoder")) == (
        "openvino",
        "onnxruntime",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("threads=0", "threads=0 is invalid"),
        ("threads", "not key=value"),
        ("colour=red", "Unknown session option"),
        ("backend=tensorrt;threads=2", "does not apply to the 'tensorrt' backend"),
        ("threads=1;threads=2", "given twice"),
        ("feature_cache_bytes=-1", "feature_cache_bytes=-1 is invalid"),
        ("prefix_cache_bytes=abc", "prefix_cache_bytes=abc is invalid"),
        ("prefix_cache_bytes=", "prefix_cache_bytes= is invalid"),
        ("verify_hashes=yes", "verify_hashes=yes is invalid"),
        ("backend=onnxruntime,speech=openvino", "Unknown graph 'speech'"),
        ("backend=auto,prefill=openvino,prefill=tensorrt", "names the prefill graph twice"),
        ("backend=tensorrt,vision=tensorrt;providers=A", "providers does not apply"),
    ],
)
def test_bad_session_options_are_refused(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_session_options(text)


@pytest.mark.parametrize(
    "text",
    [
        "backend=auto,vision=open\x1b[2Jvino\n;threads=1",  # terminal escape and a line break
        "backend=auto,\x1b]0;x\x07vision=openvino",  # an OSC title sequence splitting the pairs
        "backend=onnxruntime,prefill=openvino,prefill=onnxruntime",  # prefill named twice
        "backend=" + "auto," * 2000 + "vision=openvino",  # huge
    ],
)
def test_a_hostile_backend_choice_is_refused_in_one_escaped_line(text: str) -> None:
    """Session options come from the embedding application's configuration: data, never terminal
    control, whatever they hold."""
    with pytest.raises(InputError) as refused:
        parse_session_options(text)
    message = str(refused.value)
    assert "\n" not in message and "\x1b" not in message and "\x07" not in message


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


# --- one table: nvlm.h, nvlm_capi.c and the Python side agree ------------------------------------

CAPI = REPO / "nvlm_export" / "capi"


def header_enum(name: str) -> dict[str, int]:
    """The constants of `typedef enum NAME { ... }` in nvlm.h."""
    body = re.search(rf"typedef enum {name} \{{(.*?)\}}", (CAPI / "nvlm.h").read_text(), re.S)
    assert body is not None, name
    return {k: int(v) for k, v in re.findall(r"\b(NVLM_\w+) = (\d+)", body.group(1))}


def test_header_enums_match_the_table() -> None:
    from nvlm_export.capi.table import PIXEL_FORMATS, STATUS_CODES

    assert header_enum("nvlm_status") == {code.name: code.value for code in STATUS_CODES}
    expected = {f"NVLM_PIXEL_{pixel.name}": pixel.value for pixel in PIXEL_FORMATS}
    assert header_enum("nvlm_pixel_format") == expected


def test_docs_status_table_matches_the_table() -> None:
    from nvlm_export.capi.table import STATUS_CODES

    rows = re.findall(
        r"^\| `(NVLM_\w+)` \| (\d+) \|", (REPO / "docs" / "capi.md").read_text(), re.M
    )
    assert {name: int(value) for name, value in rows} == {c.name: c.value for c in STATUS_CODES}


def test_every_declared_function_is_defined_and_every_entry_point_implemented() -> None:
    from nvlm_export.capi.embedded import CApi
    from nvlm_export.capi.table import ENTRY_POINTS

    header = re.sub(r"/\*.*?\*/", "", (CAPI / "nvlm.h").read_text(), flags=re.S)
    source = (CAPI / "nvlm_capi.c").read_text()
    declared = set(re.findall(r"^[^#\s(][^(;]*?\b(nvlm_\w+)\(", header, re.M))
    declared -= {"nvlm_token_callback"}
    assert "nvlm_chat_ask" in declared and len(declared) > 30
    for name in sorted(declared):
        assert re.search(rf"\b{name}\([^;{{]*\)\s*\{{", source), f"{name} has no definition"
    called = set(re.findall(r"\bnvlm_py_(\w+)\(", source))
    assert called == {entry.name for entry in ENTRY_POINTS}
    for entry in ENTRY_POINTS:
        assert callable(getattr(CApi, entry.name, None)), entry.name
