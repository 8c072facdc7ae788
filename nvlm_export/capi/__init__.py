"""The C API: libnvlm.so and nvlm.h, built with `nvlm-export capi build -o DIR`.

`build.py` compiles the library with cffi's embedding mode; `embedded.py` is the Python side the
library calls into; `nvlm.h` is the public header and `nvlm_capi.c` its C entry points. See
docs/capi.md.
"""
