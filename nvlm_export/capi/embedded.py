"""The Python side of libnvlm.so: the `nvlm_py_*` functions behind the C API of nvlm.h.

libnvlm.so embeds the Python interpreter; its init code imports this module and calls
`install(ffi, lib)`, which registers one cffi `extern "Python"` implementation per C entry point.

Rules every entry point follows:

- No Python exception crosses into C: each one is wrapped by `_guarded`, which turns any exception
  into a status code and records its one-line message as the thread's last error (and the
  session's, for session calls). Internal bugs become NVLM_ERR_INTERNAL, not a crash.
- C objects are opaque handles: small integers cast to pointers, looked up in a registry. A closed
  or foreign handle is refused with NVLM_ERR_INVALID_ARGUMENT instead of being dereferenced, so a
  double close cannot crash the process, and the registry can count live objects for leak checks.
- Memory handed to C (texts, token ids, error messages) is cffi-owned and kept alive by the Python
  object it belongs to, so it is freed with that object's handle.

Only the runtime (numpy, pillow, tokenizers, onnxruntime) is imported: no torch.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from nvlm_export.capi.options import parse_session_options
from nvlm_export.capi.table import ENTRY_POINTS, STATUS_CODES, TEXT_FIELDS, PixelFormat
from nvlm_export.capi.table import PIXEL_FORMATS as PIXEL_FORMAT_TABLE
from nvlm_export.errors import (
    BundleError,
    ImageError,
    InputError,
    NvlmError,
    PromptError,
)
from nvlm_export.runtime.generation import GenerateOptions
from nvlm_export.runtime.images import check_encoded_size, load_image
from nvlm_export.runtime.limits import DEFAULT_MAX_IMAGE_BYTES

Cdata = Any  # a cffi pointer (cffi has no static types)
T = TypeVar("T")


# `nvlm_status`, from the table (Status.IMAGE is NVLM_ERR_IMAGE).
Status = IntEnum("Status", [(code.short, code.value) for code in STATUS_CODES])


class Cancelled(NvlmError):
    """The token callback asked to stop."""


# The first matching class decides the status; order from specific to general.
STATUS_FOR_ERROR: tuple[tuple[type[BaseException], Status], ...] = (
    (Cancelled, Status.CANCELLED),
    (ImageError, Status.IMAGE),
    (BundleError, Status.BUNDLE),
    (PromptError, Status.PROMPT),
    (InputError, Status.INVALID_ARGUMENT),
    (NvlmError, Status.RUNTIME),
    (MemoryError, Status.OUT_OF_MEMORY),
)


def describe(error: BaseException) -> tuple[Status, str]:
    """The status and one-line message a C caller gets for `error`."""
    for error_type, status in STATUS_FOR_ERROR:
        if isinstance(error, error_type):
            if isinstance(error, NvlmError):
                return status, error.one_line()
            return status, f"Out of memory: {error}"
    if os.environ.get("NVLM_DEBUG"):
        traceback.print_exception(error, file=sys.stderr)
    return Status.INTERNAL, (
        f"Internal error: {type(error).__name__}: {error}. "
        "Set NVLM_DEBUG=1 for the traceback on stderr and please report it."
    )


# --- the objects behind the handles ---------------------------------------------------------


# Keys are `nvlm_pixel_format` values.
PIXEL_FORMATS: dict[int, PixelFormat] = {pixel.value: pixel for pixel in PIXEL_FORMAT_TABLE}


@dataclass
class Request:
    """What `nvlm_request_*` builds: `Pipeline.generate`'s arguments, images already decoded."""

    prompt: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    options: GenerateOptions = field(default_factory=GenerateOptions)
    max_tiles: int | None = None
    system: str | None = None
    raw: bool = False
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # for images added from now on

    def generate_arguments(self) -> dict[str, Any]:
        """A snapshot for one generate call, so the request may change while it runs."""
        if self.prompt is None:
            raise InputError("The request has no prompt", fix="Call nvlm_request_set_prompt")
        return {
            "prompt": self.prompt,
            "images": list(self.images),
            "options": self.options,
            "max_tiles": self.max_tiles,
            "system": self.system,
            "raw": self.raw,
        }


class Session:
    """A loaded pipeline with a lock: one request at a time, refused re-entry from a callback."""

    def __init__(self, pipeline: Any, ffi: Any) -> None:
        self.pipeline = pipeline
        self._ffi = ffi
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread running a request, if any
        self.closed = False  # set under the lock by close
        self.last_error: Cdata = ffi.new("char[]", b"")

    @contextmanager
    def busy(self) -> Iterator[None]:
        if self._owner == threading.get_ident():
            raise InputError(
                "This session is running a request on this thread",
                why="the call came from inside its own token callback",
                fix="Return from the callback first; use another session for nested requests",
            )
        with self._lock:
            # A caller that looked the session up before a concurrent close and then waited here
            # must not run on it: the close released its runners.
            if self.closed:
                raise InputError(
                    "The session was closed while this call waited for it",
                    fix="Do not close a session that other threads still use",
                )
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def record_error(self, message: str) -> None:
        self.last_error = self._ffi.new("char[]", message.encode("utf-8", "replace"))

    def release(self) -> None:
        for runner in self.pipeline.runners.values():
            runner.deactivate()


class Chat:
    """A conversation on a session; its turns run under the session's lock."""

    def __init__(self, session: Session, conversation: Any) -> None:
        self.session = session
        self.conversation = conversation  # nvlm_export.runtime.conversation.Conversation


@dataclass
class Result:
    """A finished answer, with its strings and ids in C memory owned by this object."""

    text: Cdata
    finish_reason: Cdata
    token_ids: Cdata
    num_tokens: int
    prompt_tokens: int
    reused_tokens: int
    timings: dict[str, float]


class Registry:
    """Live objects by handle. Handles are never reused, so a stale one is always refused."""

    def __init__(self, ffi: Any) -> None:
        self._ffi = ffi
        self._objects: dict[int, object] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, obj: object, ctype: str) -> Cdata:
        with self._lock:
            handle = next(self._ids)
            self._objects[handle] = obj
        return self._ffi.cast(ctype, handle)

    def get(self, handle: Cdata, kind: type[T]) -> T:
        obj = self._objects.get(self._key(handle))
        if not isinstance(obj, kind):
            raise InputError(
                f"The nvlm_{kind.__name__.lower()} handle is not valid",
                why="it is NULL, already closed or destroyed, or another kind of object",
            )
        return obj

    def remove(self, handle: Cdata, kind: type[T]) -> T:
        obj = self.get(handle, kind)
        with self._lock:
            self._objects.pop(self._key(handle), None)
        return obj

    def count(self, kind: type) -> int:
        return sum(isinstance(obj, kind) for obj in list(self._objects.values()))

    def _key(self, handle: Cdata) -> int:
        return int(self._ffi.cast("uintptr_t", handle))


# --- the entry points -----------------------------------------------------------------------


def _result_field(name: str) -> Callable[[CApi, Cdata], Any]:
    """The entry point `result_<name>`: that field of a result (C memory the result owns)."""

    def result_field(api: CApi, handle: Cdata) -> Any:
        return getattr(api.handles.get(handle, Result), name)

    result_field.__name__ = f"result_{name}"
    return result_field


class CApi:
    """One method per `nvlm_py_*` function; `install` registers them with cffi."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self.ffi = ffi
        self.lib = lib
        self.handles = Registry(ffi)

    # -- helpers --
    def fail(self, error: BaseException, session: Session | None = None) -> Status:
        status, message = describe(error)
        self.lib.nvlm_set_thread_error(message.encode("utf-8", "replace"))
        if session is not None:
            session.record_error(message)
        return status

    def text(self, pointer: Cdata, what: str, *, allow_null: bool = False) -> str | None:
        if pointer == self.ffi.NULL:
            if allow_null:
                return None
            raise InputError(f"The {what} is NULL")
        try:
            return self.ffi.string(pointer).decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"The {what} is not valid UTF-8", why=str(error)) from None

    def store(self, out: Cdata, obj: object, ctype: str) -> None:
        """Write a new handle for `obj` to the out-parameter `out`."""
        if out == self.ffi.NULL:
            raise InputError(f"The out-parameter for the new {ctype.rstrip(' *')} is NULL")
        out[0] = self.handles.add(obj, ctype)

    # -- process --
    def ready(self) -> int:
        return 1

    def debug_live_objects(
        self, sessions: Cdata, requests: Cdata, results: Cdata, chats: Cdata
    ) -> Status:
        counted = ((sessions, Session), (requests, Request), (results, Result), (chats, Chat))
        for out, kind in counted:
            if out != self.ffi.NULL:
                out[0] = self.handles.count(kind)
        return Status.OK

    # -- sessions --
    def session_open(self, bundle_path: Cdata, options: Cdata, out_session: Cdata) -> Status:
        from nvlm_export.runtime.pipeline import Pipeline

        if out_session == self.ffi.NULL:
            raise InputError("The out-parameter for the new session is NULL")
        path = self.text(bundle_path, "bundle path")
        backend, keywords = parse_session_options(self.text(options, "options", allow_null=True))
        pipeline = Pipeline.load(path, backend=backend, **keywords)
        self.store(out_session, Session(pipeline, self.ffi), "nvlm_session *")
        return Status.OK

    def session_close(self, handle: Cdata) -> None:
        session = self.handles.get(handle, Session)
        with session.busy():  # waits for a running request; refuses a close from its callback
            self.handles.remove(handle, Session)
            session.closed = True
            session.release()

    def session_last_error(self, handle: Cdata) -> Cdata:
        return self.handles.get(handle, Session).last_error

    def session_generate(
        self,
        session_handle: Cdata,
        request_handle: Cdata,
        on_token: Cdata,
        user_data: Cdata,
        out_result: Cdata,
    ) -> Status:
        session = self.handles.get(session_handle, Session)

        def start(arguments: dict[str, Any]) -> Any:
            return session.pipeline.generate(**arguments)

        return self._answer(session, request_handle, start, on_token, user_data, out_result)

    def _answer(
        self,
        session: Session,
        request_handle: Cdata,
        start: Callable[[dict[str, Any]], Any],
        on_token: Cdata,
        user_data: Cdata,
        out_result: Cdata,
    ) -> Status:
        """Start a request from the request's arguments with the session locked, stream it to
        `on_token` and hand out its result; a failure is also recorded as the session's error."""
        try:
            arguments = self.handles.get(request_handle, Request).generate_arguments()
            with session.busy():
                result = self._stream(start(arguments), on_token, user_data)
            if out_result != self.ffi.NULL:
                self.store(out_result, result, "nvlm_result *")
        except BaseException as error:
            return self.fail(error, session)
        return Status.OK

    def _stream(self, stream: Any, on_token: Cdata, user_data: Cdata) -> Result:
        """Read a request's token stream to its end, calling `on_token` for every token; a
        non-zero return abandons the stream (so a chat turn is dropped) and raises Cancelled."""
        received = 0
        for event in stream:
            received += 1
            if on_token == self.ffi.NULL:
                continue
            if on_token(event.text.encode("utf-8"), event.token_id, user_data) != 0:
                raise Cancelled(
                    f"Generation was cancelled by the token callback at token {received}"
                )
        answer = stream.result
        ids = [int(t) for t in answer.token_ids]
        timings = dict(stream.stage_seconds)
        timings["time_to_first_token"] = answer.timings.time_to_first_token
        timings["decode_tokens_per_second"] = answer.timings.decode_tokens_per_second
        return Result(
            text=self.ffi.new("char[]", answer.text.encode("utf-8")),
            finish_reason=self.ffi.new("char[]", answer.finish_reason.encode()),
            token_ids=self.ffi.new("int32_t[]", ids),
            num_tokens=len(ids),
            prompt_tokens=stream.prepared.prompt.num_tokens,
            reused_tokens=stream.reused_tokens,
            timings=timings,
        )

    # -- chats --
    def chat_create(
        self, session_handle: Cdata, system: Cdata, max_tiles: int, out_chat: Cdata
    ) -> Status:
        session = self.handles.get(session_handle, Session)
        system_text = self.text(system, "system message", allow_null=True)
        conversation = session.pipeline.chat(system=system_text, max_tiles=_tile_budget(max_tiles))
        self.store(out_chat, Chat(session, conversation), "nvlm_chat *")
        return Status.OK

    def chat_destroy(self, handle: Cdata) -> None:
        chat = self.handles.get(handle, Chat)
        if chat.session.closed:  # nothing can be running on it
            self.handles.remove(handle, Chat)
            return
        with chat.session.busy():  # waits for a running turn; refused from its own callback
            self.handles.remove(handle, Chat)

    def chat_ask(
        self,
        chat_handle: Cdata,
        request_handle: Cdata,
        on_token: Cdata,
        user_data: Cdata,
        out_result: Cdata,
    ) -> Status:
        chat = self.handles.get(chat_handle, Chat)
        if chat.session.closed:
            raise InputError(
                "The chat's session is closed",
                fix="Destroy chats before closing their session; open a new session and chat",
            )

        def start(arguments: dict[str, Any]) -> Any:
            return chat.conversation.ask(*_chat_turn(arguments))

        return self._answer(chat.session, request_handle, start, on_token, user_data, out_result)

    def chat_reset(self, handle: Cdata) -> Status:
        chat = self.handles.get(handle, Chat)
        with chat.session.busy():
            chat.conversation.reset()
        return Status.OK

    def chat_get_length(self, handle: Cdata, out_turns: Cdata, out_tokens: Cdata) -> Status:
        conversation = self.handles.get(handle, Chat).conversation
        if out_turns != self.ffi.NULL:
            out_turns[0] = conversation.turns
        if out_tokens != self.ffi.NULL:
            out_tokens[0] = conversation.num_tokens
        return Status.OK

    # -- requests --
    def request_create(self, out_request: Cdata) -> Status:
        self.store(out_request, Request(), "nvlm_request *")
        return Status.OK

    def request_destroy(self, handle: Cdata) -> None:
        self.handles.remove(handle, Request)

    def request_set_text(self, handle: Cdata, which: int, value: Cdata) -> Status:
        request = self.handles.get(handle, Request)
        field_name = TEXT_FIELDS[which] if 0 <= which < len(TEXT_FIELDS) else None
        if field_name == "PROMPT":
            request.prompt = self.text(value, "prompt")
        elif field_name == "SYSTEM":
            request.system = self.text(value, "system message", allow_null=True)
        elif field_name == "STOP":
            stop = self.text(value, "stop string")
            request.options = request.options.replace(stop=(*request.options.stop, stop))
        else:
            raise InputError(f"Unknown request text field {which}")
        return Status.OK

    def request_set_raw(self, handle: Cdata, raw: int) -> Status:
        self.handles.get(handle, Request).raw = bool(raw)
        return Status.OK

    def request_add_image_bytes(self, handle: Cdata, data: Cdata, size: int) -> Status:
        request = self.handles.get(handle, Request)
        if data == self.ffi.NULL:
            raise InputError("The image data pointer is NULL")
        check_encoded_size(size, request.max_image_bytes, "The image data")  # before copying
        encoded = bytes(self.ffi.buffer(self.ffi.cast("char *", data), size))
        request.images.append(load_image(encoded, max_bytes=request.max_image_bytes))
        return Status.OK

    def request_add_image_file(self, handle: Cdata, path: Cdata) -> Status:
        request = self.handles.get(handle, Request)
        path_text = self.text(path, "image path")
        request.images.append(load_image(path_text, max_bytes=request.max_image_bytes))
        return Status.OK

    def request_add_image_pixels(
        self, handle: Cdata, pixels: Cdata, width: int, height: int, stride: int, format: int
    ) -> Status:
        request = self.handles.get(handle, Request)
        array = pixels_to_array(self.ffi, pixels, width, height, stride, format)
        request.images.append(load_image(array))
        return Status.OK

    def request_clear_images(self, handle: Cdata) -> Status:
        self.handles.get(handle, Request).images.clear()
        return Status.OK

    def request_set_max_new_tokens(self, handle: Cdata, max_new_tokens: int) -> Status:
        request = self.handles.get(handle, Request)
        request.options = request.options.replace(max_new_tokens=max_new_tokens)
        return Status.OK

    def request_set_sampling(
        self, handle: Cdata, temperature: float, top_k: int, top_p: float
    ) -> Status:
        request = self.handles.get(handle, Request)
        request.options = request.options.replace(temperature=temperature, top_k=top_k, top_p=top_p)
        return Status.OK

    def request_set_seed(self, handle: Cdata, seed: int) -> Status:
        request = self.handles.get(handle, Request)
        request.options = request.options.replace(seed=int(seed))
        return Status.OK

    def request_set_max_image_bytes(self, handle: Cdata, max_bytes: int) -> Status:
        request = self.handles.get(handle, Request)
        request.max_image_bytes = max_bytes or DEFAULT_MAX_IMAGE_BYTES
        return Status.OK

    def request_set_max_tiles(self, handle: Cdata, max_tiles: int) -> Status:
        request = self.handles.get(handle, Request)
        request.max_tiles = _tile_budget(max_tiles)
        return Status.OK

    # -- results --
    result_text = _result_field("text")
    result_finish_reason = _result_field("finish_reason")
    result_prompt_tokens = _result_field("prompt_tokens")
    result_reused_tokens = _result_field("reused_tokens")

    def result_token_ids(self, handle: Cdata, out_count: Cdata) -> Cdata:
        result = self.handles.get(handle, Result)
        if out_count != self.ffi.NULL:
            out_count[0] = result.num_tokens
        return result.token_ids

    def result_get_timings(self, handle: Cdata, out: Cdata) -> Status:
        timings = self.handles.get(handle, Result).timings
        if out == self.ffi.NULL:
            raise InputError("The out-parameter for the timings is NULL")
        for stage in ("prepare", "vision", "splice", "prefill", "decode"):
            setattr(out, f"{stage}_seconds", timings.get(stage, 0.0))
        out.time_to_first_token_seconds = timings["time_to_first_token"]
        out.decode_tokens_per_second = timings["decode_tokens_per_second"]
        return Status.OK

    def result_destroy(self, handle: Cdata) -> None:
        self.handles.remove(handle, Result)


def _tile_budget(max_tiles: int) -> int | None:
    """A C tile budget: 0 means the bundle's own, a negative one is refused."""
    if max_tiles < 0:
        raise InputError(f"max_tiles {max_tiles} is invalid", fix="Use 0 (the bundle's) or >= 1")
    return max_tiles or None


def _chat_turn(arguments: dict[str, Any]) -> tuple[str, list[Image.Image], GenerateOptions]:
    """The question, images and generation options of a request used as a chat turn. The chat's
    own settings may not be set on the request."""
    owned_by_chat = {"system": None, "max_tiles": None, "raw": False}
    for key, unset in owned_by_chat.items():
        if arguments.pop(key) != unset:
            raise InputError(
                f"A chat turn's request sets {key}",
                why="the system message and tile budget belong to the whole conversation, and a "
                "chat always applies the chat template",
                fix="Pass them to nvlm_chat_create instead (raw prompts only with "
                "nvlm_session_generate)",
            )
    return arguments["prompt"], arguments["images"], arguments["options"]


def pixels_to_array(
    ffi: Any, pixels: Cdata, width: int, height: int, stride: int, format: int
) -> np.ndarray:
    """Copy a strided pixel buffer into an H×W×C RGB(A) (or H×W gray) uint8 array."""
    pixel_format = PIXEL_FORMATS.get(format)
    if pixel_format is None:
        raise InputError(f"Unknown pixel format {format}", fix="Use an nvlm_pixel_format value")
    if pixels == ffi.NULL:
        raise InputError("The pixel buffer is NULL")
    channels = pixel_format.bytes_per_pixel
    if width < 1 or height < 1:
        raise ImageError(f"The image is empty ({width}x{height} pixels)")
    if stride < width * channels:
        raise InputError(
            f"The row stride {stride} is smaller than a row ({width} x {channels} bytes)",
            fix="Pass the distance in bytes between the starts of two rows",
        )
    size = stride * (height - 1) + width * channels  # the last row needs no padding
    flat = np.frombuffer(ffi.buffer(ffi.cast("uint8_t *", pixels), size), dtype=np.uint8)
    rows = np.lib.stride_tricks.as_strided(
        flat, shape=(height, width, channels), strides=(stride, channels, 1), writeable=False
    )
    array = rows[:, :, list(pixel_format.channel_order)]  # fancy indexing copies
    return array[:, :, 0] if channels == 1 else array


# --- registration -----------------------------------------------------------------------------


def _guarded(api: CApi, method: Callable[..., Any], on_error: str) -> Callable[..., Any]:
    """Run `method`; on any exception record it and return the failure value C expects."""
    failure_values = {"null": api.ffi.NULL, "zero": 0, "void": None}

    def entry_point(*args: Any) -> Any:
        try:
            return method(*args)
        except BaseException as error:  # nothing may unwind into C
            status = api.fail(error)
            return int(status) if on_error == "status" else failure_values[on_error]

    return entry_point


_installed: list[CApi] = []  # keeps the registered API alive for the life of the process


def install(ffi: Any, lib: Any) -> CApi:
    """Register every `nvlm_py_*` implementation with cffi (called once by the init code)."""
    api = CApi(ffi, lib)
    for entry in ENTRY_POINTS:
        entry_point = _guarded(api, getattr(api, entry.name), entry.on_error)
        # `error` is what cffi itself returns should even the guard fail (e.g. MemoryError).
        fallback = {"error": int(Status.INTERNAL)} if entry.on_error == "status" else {}
        ffi.def_extern(name=f"nvlm_py_{entry.name}", **fallback)(entry_point)
    _installed.append(api)
    return api
