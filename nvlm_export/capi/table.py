"""The C API's facts in one place: status codes, pixel formats, text fields and entry points.

Everything on the Python side derives from these tables: `embedded.py`'s `Status` and pixel
formats, the `nvlm_py_*` implementations it registers (`ENTRY_POINTS`), and what `build.py` feeds
the compiler — cffi's `extern "Python"` declarations and `nvlm_py.h`, the header of the library's
C source with the same functions' prototypes, the text-field numbers and the status names. The
public header `nvlm.h` is written by hand for its readers; tests/test_capi.py parses it and checks
its enum values against these tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class StatusCode:
    name: str  # the nvlm_status constant, e.g. NVLM_ERR_IMAGE
    value: int
    meaning: str

    @property
    def short(self) -> str:
        """The Python name: IMAGE for NVLM_ERR_IMAGE, OK for NVLM_OK."""
        return self.name.removeprefix("NVLM_ERR_").removeprefix("NVLM_")


STATUS_CODES: tuple[StatusCode, ...] = (
    StatusCode("NVLM_OK", 0, "success"),
    StatusCode("NVLM_ERR_INVALID_ARGUMENT", 1, "NULL or dead handle, bad option or parameter"),
    StatusCode("NVLM_ERR_BUNDLE", 2, "bundle missing, corrupt or from an incompatible exporter"),
    StatusCode("NVLM_ERR_IMAGE", 3, "image cannot be decoded, is empty or too large"),
    StatusCode("NVLM_ERR_PROMPT", 4, "prompt does not fit the context or the images"),
    StatusCode("NVLM_ERR_CANCELLED", 5, "the token callback returned non-zero"),
    StatusCode("NVLM_ERR_RUNTIME", 6, "the inference backend failed or is not installed"),
    StatusCode("NVLM_ERR_OUT_OF_MEMORY", 7, "out of memory"),
    StatusCode("NVLM_ERR_PYTHON", 8, "the embedded interpreter or nvlm_export cannot start"),
    StatusCode("NVLM_ERR_INTERNAL", 9, "a bug: please report it with nvlm_last_error()"),
)


@dataclass(frozen=True)
class PixelFormat:
    name: str  # after NVLM_PIXEL_
    value: int
    channel_order: tuple[int, ...]  # source channels in RGB(A) order

    @property
    def bytes_per_pixel(self) -> int:
        return len(self.channel_order)


PIXEL_FORMATS: tuple[PixelFormat, ...] = (
    PixelFormat("RGB", 0, (0, 1, 2)),
    PixelFormat("BGR", 1, (2, 1, 0)),
    PixelFormat("RGBA", 2, (0, 1, 2, 3)),
    PixelFormat("BGRA", 3, (2, 1, 0, 3)),
    PixelFormat("GRAY", 4, (0,)),
)

# The text fields `nvlm_py_request_set_text` sets, by number (NVLM_TEXT_<NAME> in nvlm_py.h): one
# Python entry point behind nvlm_request_set_prompt, _set_system and _add_stop.
TEXT_FIELDS: tuple[str, ...] = ("PROMPT", "SYSTEM", "STOP")

OnError = Literal["status", "null", "zero", "void"]


@dataclass(frozen=True)
class EntryPoint:
    """`nvlm_py_<name>`, implemented by the `CApi` method `<name>`. `on_error` is what C gets
    back when that method raises: an nvlm_status, a NULL pointer, 0, or nothing."""

    name: str
    returns: str
    params: str
    on_error: OnError

    def declaration(self, prefix: str = "") -> str:
        return f"{prefix}{self.returns} nvlm_py_{self.name}({self.params});"


ENTRY_POINTS: tuple[EntryPoint, ...] = (
    EntryPoint("ready", "int", "void", "zero"),
    EntryPoint("debug_live_objects", "int", "int32_t*, int32_t*, int32_t*, int32_t*", "status"),
    EntryPoint("session_open", "int", "const char*, const char*, nvlm_session**", "status"),
    EntryPoint("session_close", "void", "nvlm_session*", "void"),
    EntryPoint("session_last_error", "const char*", "const nvlm_session*", "null"),
    EntryPoint(
        "session_generate",
        "int",
        "nvlm_session*, const nvlm_request*, nvlm_token_callback, void*, nvlm_result**",
        "status",
    ),
    EntryPoint("request_create", "int", "nvlm_request**", "status"),
    EntryPoint("request_destroy", "void", "nvlm_request*", "void"),
    EntryPoint("request_set_text", "int", "nvlm_request*, int, const char*", "status"),
    EntryPoint("request_set_raw", "int", "nvlm_request*, int", "status"),
    EntryPoint("request_add_image_bytes", "int", "nvlm_request*, const void*, size_t", "status"),
    EntryPoint("request_add_image_file", "int", "nvlm_request*, const char*", "status"),
    EntryPoint(
        "request_add_image_pixels",
        "int",
        "nvlm_request*, const uint8_t*, int32_t, int32_t, int32_t, int",
        "status",
    ),
    EntryPoint("request_clear_images", "int", "nvlm_request*", "status"),
    EntryPoint("request_set_max_new_tokens", "int", "nvlm_request*, int32_t", "status"),
    EntryPoint("request_set_sampling", "int", "nvlm_request*, float, int32_t, float", "status"),
    EntryPoint("request_set_seed", "int", "nvlm_request*, uint64_t", "status"),
    EntryPoint("request_set_max_tiles", "int", "nvlm_request*, int32_t", "status"),
    EntryPoint("request_set_max_image_bytes", "int", "nvlm_request*, uint64_t", "status"),
    EntryPoint("chat_create", "int", "nvlm_session*, const char*, int32_t, nvlm_chat**", "status"),
    EntryPoint("chat_destroy", "void", "nvlm_chat*", "void"),
    EntryPoint(
        "chat_ask",
        "int",
        "nvlm_chat*, const nvlm_request*, nvlm_token_callback, void*, nvlm_result**",
        "status",
    ),
    EntryPoint("chat_reset", "int", "nvlm_chat*", "status"),
    EntryPoint("chat_get_length", "int", "const nvlm_chat*, int32_t*, int32_t*", "status"),
    EntryPoint("result_text", "const char*", "const nvlm_result*", "null"),
    EntryPoint("result_finish_reason", "const char*", "const nvlm_result*", "null"),
    EntryPoint("result_token_ids", "const int32_t*", "const nvlm_result*, size_t*", "null"),
    EntryPoint("result_prompt_tokens", "int32_t", "const nvlm_result*", "zero"),
    EntryPoint("result_reused_tokens", "int32_t", "const nvlm_result*", "zero"),
    EntryPoint("result_get_timings", "int", "const nvlm_result*, nvlm_timings*", "status"),
    EntryPoint("result_destroy", "void", "nvlm_result*", "void"),
)


def python_declarations() -> str:
    """The `extern "Python"` block of cffi's cdef: every entry point, as cffi must see it."""
    lines = [entry.declaration() for entry in ENTRY_POINTS]
    return 'extern "Python" {\n' + "\n".join(lines) + "\n}\n"


def c_header() -> str:
    """`nvlm_py.h`, included by nvlm_capi.c after nvlm.h: the entry points' prototypes (static:
    only nvlm_capi.c calls them; cffi defines them further down), the text-field numbers and
    the status names."""
    text_fields = ", ".join(f"NVLM_TEXT_{name} = {i}" for i, name in enumerate(TEXT_FIELDS))
    names = "\n".join(f'    [{c.value}] = "{c.name}",' for c in STATUS_CODES)
    return "\n".join(
        [
            "/* Generated by nvlm_export/capi/build.py from nvlm_export/capi/table.py. */",
            *(entry.declaration("static ") for entry in ENTRY_POINTS),
            f"enum {{ {text_fields} }};",
            f"static const char* const nvlm_status_names[{len(STATUS_CODES)}] = {{",
            names,
            "};",
            "",
        ]
    )
