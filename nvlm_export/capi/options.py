"""The `options` string of `nvlm_session_open`: "backend=onnxruntime;threads=2;providers=A,B".

Each option is declared once below (its key, the `Pipeline.load` keyword it becomes, how its value
is parsed, and whether a graph's runner or the pipeline takes it). `backend` is a backend choice as
the CLI's `--backend` writes it ("auto", "onnxruntime,vision=openvino,prefill=openvino"); which
runner takes which option is the runners' own signatures (`BackendChoice.check_options`). Unknown
keys and options no chosen backend takes are refused with a message listing what is accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nvlm_export.errors import InputError
from nvlm_export.runtime.backends import DEFAULT_BACKEND, BackendChoice

BACKEND_KEY = "backend"


def _int_at_least(minimum: int, unit: str = "") -> Callable[[str, str], int]:
    """A parser of whole numbers >= `minimum`; anything else is refused naming the key."""

    def parse(key: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            off = " (0 = off)" if minimum == 0 else ""
            raise InputError(
                f"Option {key}={text} is invalid", fix=f"Use {key}=N{unit} with N >= {minimum}{off}"
            )
        return value

    return parse


def _name_list(key: str, text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise InputError(f"Option {key} is empty", fix=f"Use {key}=Name1,Name2")
    return names


def _flag(key: str, text: str) -> bool:
    if text not in ("0", "1"):
        raise InputError(f"Option {key}={text} is invalid", fix=f"Use {key}=1 or {key}=0")
    return text == "1"


def _word(key: str, text: str) -> str:
    if not text:
        raise InputError(f"Option {key} is empty", fix=f"Give {key} a value or leave it out")
    return text


@dataclass(frozen=True)
class SessionOption:
    key: str
    keyword: str  # the Pipeline.load / backend runner keyword
    parse: Callable[[str, str], Any]
    runner: bool = False  # taken by the graphs' runners (checked against the backends chosen)


OPTIONS: dict[str, SessionOption] = {
    option.key: option
    for option in (
        SessionOption("threads", "intra_op_threads", _int_at_least(1), runner=True),
        SessionOption("providers", "providers", _name_list, runner=True),
        SessionOption("optimization_level", "optimization_level", _word, runner=True),
        SessionOption("verify_hashes", "verify_hashes", _flag),
        SessionOption("feature_cache_bytes", "feature_cache_bytes", _int_at_least(0, " bytes")),
        SessionOption("prefix_cache_bytes", "prefix_cache_bytes", _int_at_least(0, " bytes")),
    )
}


def parse_session_options(text: str | None) -> tuple[BackendChoice, dict[str, Any]]:
    """The backend choice and the keyword options for `Pipeline.load`."""
    pairs = _split_pairs(text or "")
    # Not the CLI's "auto": an embedded session runs where its options say, whatever else is
    # installed, unless they ask for "auto".
    choice = BackendChoice.parse(pairs.pop(BACKEND_KEY, DEFAULT_BACKEND))
    keywords: dict[str, Any] = {}
    for key, value in pairs.items():
        option = OPTIONS.get(key)
        if option is None:
            known = ", ".join([BACKEND_KEY, *OPTIONS])
            raise InputError(f"Unknown session option '{key}'", fix=f"Use one of: {known}")
        keywords[option.keyword] = option.parse(key, value)
    runner_options = {k: v for k, v in keywords.items() if _by_keyword(k).runner}
    choice.check_options(runner_options, shown={o.keyword: o.key for o in OPTIONS.values()})
    return choice, keywords


def _by_keyword(keyword: str) -> SessionOption:
    return next(option for option in OPTIONS.values() if option.keyword == keyword)


def _split_pairs(text: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue  # tolerate "a=1;" and empty strings
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise InputError(
                f"Session option '{item.strip()}' is not key=value",
                fix="Write options as key=value pairs separated by ';'",
            )
        if key in pairs:
            raise InputError(f"Session option '{key}' is given twice")
        pairs[key] = value.strip()
    return pairs
