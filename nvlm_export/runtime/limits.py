"""Upper bounds on untrusted input, in one place (docs/security.md explains each).

Plain constants with no imports, so the CLI can show them in `--help` without loading numpy.
"""

# Tiling settings that size work: the grid search is cubic in max_tiles and a tile is resized to
# tile_size squared. Both are far above any released model (NVLM-D: 6 tiles, InternVL2: 12;
# 448-pixel tiles).
MAX_TILES = 64
MAX_TILE_SIZE = 2048

# Image files larger than this are refused before a byte is read (`load_image(max_bytes=)`,
# `Pipeline.load(max_image_bytes=)`, C: `nvlm_request_set_max_image_bytes`). 64 MiB holds a
# losslessly compressed 64-megapixel photo; camera frames are a few MB.
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20

# Decoded images larger than this are refused (`load_image(max_pixels=)`): bigger than any phone
# or Jetson camera frame (a 48 MP sensor fits), small enough that a crafted file cannot make us
# allocate gigabytes before we notice.
DEFAULT_MAX_PIXELS = 64_000_000

# A bundle's context length (`kv_cache.max_context`) sizes the KV cache buffers a request
# allocates. 2**20 tokens is 32x NVLM-D-72B's 32768 positions and 8x any 128k-context decoder.
MAX_CONTEXT = 2**20
