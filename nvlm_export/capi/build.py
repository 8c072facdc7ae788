"""Build libnvlm.so with cffi's embedding mode: the C API of nvlm.h over the Python runtime.

    build_library(Path("dist/capi"))  # -> dist/capi/{lib/libnvlm.so, include/nvlm.h,
                                      #              lib/pkgconfig/nvlm.pc}

How the library is put together:

- `nvlm_capi.c` (the public C functions) is cffi's `set_source` code; it calls `nvlm_py_*`
  functions declared once in `table.py` (as `extern "Python"` in `CDEF` below, and as C
  prototypes in the generated `nvlm_py.h`) and implemented in `embedded.py`;
- `INIT_CODE` runs inside the embedded interpreter on the first call and registers them;
- the library links the shared libpython of the building interpreter, with an rpath to it, and
  records that interpreter's path (`NVLM_PYTHON_EXECUTABLE`): at run time it starts Python as
  that executable, so a virtual environment's site-packages are found without PYTHONPATH.

Why cffi: it is the maintained, documented way to put a C ABI in front of Python code
(`embedding_api` / `embedding_init_code`), it handles interpreter start-up, the GIL and
thread-state bookkeeping for calls from arbitrary C threads, and its API mode checks our C
declarations against the real header at compile time.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nvlm_export import __version__
from nvlm_export.capi.table import c_header, python_declarations
from nvlm_export.errors import MissingExtraError, NvlmError
from nvlm_export.output import make_directory

PACKAGE_DIR = Path(__file__).resolve().parent
HEADER = PACKAGE_DIR / "nvlm.h"
C_SOURCE = PACKAGE_DIR / "nvlm_capi.c"
PKGCONFIG_TEMPLATE = PACKAGE_DIR / "nvlm.pc.in"
GENERATED_HEADER = "nvlm_py.h"  # table.py's prototypes, included by nvlm_capi.c
MODULE_NAME = "_nvlm_cffi"
LIBRARY_NAME = "libnvlm.so"

# What Python sees of the C side: the types of nvlm.h it touches, the implementations it provides
# (`extern "Python"`, from table.py's ENTRY_POINTS) and the one C helper it calls.
CDEF = """
typedef struct nvlm_session nvlm_session;
typedef struct nvlm_request nvlm_request;
typedef struct nvlm_result nvlm_result;
typedef struct nvlm_chat nvlm_chat;
typedef int (*nvlm_token_callback)(const char* piece, int32_t token_id, void* user_data);
typedef struct nvlm_timings {
    double prepare_seconds;
    double vision_seconds;
    double splice_seconds;
    double prefill_seconds;
    double decode_seconds;
    double time_to_first_token_seconds;
    double decode_tokens_per_second;
} nvlm_timings;

void nvlm_set_thread_error(const char* message);
""" + python_declarations()

INIT_CODE = f"""
from {MODULE_NAME} import ffi, lib
from nvlm_export.capi.embedded import install
install(ffi, lib)
"""


@dataclass(frozen=True)
class PythonLinkage:
    """Where the building interpreter's headers and shared library are."""

    executable: str
    include_dir: Path
    library_dir: Path
    library_name: str  # for -l, e.g. "python3.11"
    soname: str  # what the dynamic loader knows it as, e.g. "libpython3.11.so.1.0"

    @classmethod
    def current(cls) -> PythonLinkage:
        version = f"{sys.version_info.major}.{sys.version_info.minor}{sys.abiflags}"
        return cls(
            executable=sys.executable,
            include_dir=Path(sysconfig.get_paths()["include"]),
            library_dir=Path(sysconfig.get_config_var("LIBDIR") or sys.base_prefix + "/lib"),
            library_name=f"python{version}",
            soname=sysconfig.get_config_var("INSTSONAME") or f"libpython{version}.so",
        )


@dataclass(frozen=True)
class BuiltLibrary:
    """The files `build_library` wrote."""

    root: Path
    library: Path
    header: Path
    pkgconfig: Path


def build_library(out_dir: Path, *, verbose: bool = False) -> BuiltLibrary:
    """Compile libnvlm.so for this Python environment into `out_dir` (lib/, include/,
    lib/pkgconfig/). Fails with one line when cffi, a C compiler, the Python headers or a shared
    libpython are missing."""
    python = PythonLinkage.current()
    _check_toolchain(python)
    root = make_directory(Path(out_dir), "the C library").resolve()
    lib_dir, include_dir = root / "lib", root / "include"
    for directory in (lib_dir, include_dir, lib_dir / "pkgconfig"):
        directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nvlm-capi-") as scratch:
        built = _compile(python, Path(scratch), verbose=verbose)
        library = lib_dir / LIBRARY_NAME
        shutil.copyfile(built, library)
    header = include_dir / HEADER.name
    shutil.copyfile(HEADER, header)
    pkgconfig = lib_dir / "pkgconfig" / "nvlm.pc"
    pkgconfig.write_text(render_pkgconfig(root))
    return BuiltLibrary(root, library, header, pkgconfig)


def render_pkgconfig(root: Path) -> str:
    text = PKGCONFIG_TEMPLATE.read_text()
    return text.replace("@PREFIX@", str(root)).replace("@VERSION@", __version__)


def _compile(python: PythonLinkage, scratch: Path, *, verbose: bool) -> Path:
    import cffi

    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.embedding_api("")  # embedding mode; the public symbols are plain C in nvlm_capi.c
    builder.embedding_init_code(INIT_CODE)
    generated = scratch / "include"
    generated.mkdir()
    (generated / GENERATED_HEADER).write_text(c_header())
    builder.set_source(
        MODULE_NAME,
        _c_source(python),
        include_dirs=[str(PACKAGE_DIR), str(generated)],
        library_dirs=[str(python.library_dir)],
        libraries=["dl"],
        extra_compile_args=["-std=gnu11", "-pthread"],
        # rpath: the library finds libpython where it was built, with no LD_LIBRARY_PATH.
        extra_link_args=[
            "-pthread",
            f"-Wl,-rpath,{python.library_dir}",
            f"-Wl,-soname,{LIBRARY_NAME}",
        ],
    )
    try:
        output = builder.compile(tmpdir=str(scratch), target=LIBRARY_NAME, verbose=verbose)
    except Exception as error:  # setuptools raises CompileError / LinkError / DistutilsExecError
        raise NvlmError(
            "Compiling libnvlm.so failed",
            why=str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
            fix="Re-run with --verbose to see the compiler output",
        ) from error
    return Path(output)


def _c_source(python: PythonLinkage) -> str:
    defines = {
        "NVLM_VERSION_STRING": __version__,
        "NVLM_PYTHON_EXECUTABLE": python.executable,
        "NVLM_LIBPYTHON": python.soname,
    }
    lines = [f"#define {name} {_c_string(value)}" for name, value in defines.items()]
    return "\n".join([*lines, C_SOURCE.read_text()])


def _c_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_toolchain(python: PythonLinkage) -> None:
    if importlib.util.find_spec("cffi") is None:
        raise MissingExtraError(
            "Building the C API needs the 'capi' extra",
            why="cffi is not installed",
            fix="Install it with: pip install 'nvlm-export[capi]'",
        )
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")[0]
    if shutil.which(compiler) is None:
        raise MissingExtraError(
            f"No C compiler: '{compiler}' is not on PATH",
            fix="Install one (e.g. apt install build-essential) or set CC",
        )
    if not (python.include_dir / "Python.h").is_file():
        raise MissingExtraError(
            f"The Python headers are missing (no Python.h in {python.include_dir})",
            fix=f"Install them (e.g. apt install python{sys.version_info[0]}."
            f"{sys.version_info[1]}-dev)",
        )
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") and not _has_shared_libpython(python):
        raise MissingExtraError(
            "This Python has no shared libpython to embed",
            why="it was built without --enable-shared",
            fix="Use a Python built with --enable-shared (distribution Pythons are; for pyenv: "
            "PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...)",
        )


def _has_shared_libpython(python: PythonLinkage) -> bool:
    return any(python.library_dir.glob(f"lib{python.library_name}.so*"))
