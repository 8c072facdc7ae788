/*
 * nvlm.h — the C API of nvlm-export: run an exported NVLM / InternVL bundle from C or C++.
 *
 *     nvlm_session* session = NULL;
 *     if (nvlm_session_open("bundle/", "threads=2", &session) != NVLM_OK) {
 *         fprintf(stderr, "%s\n", nvlm_last_error());
 *         return 1;
 *     }
 *     nvlm_request* request = NULL;
 *     nvlm_request_create(&request);
 *     nvlm_request_set_prompt(request, "What is in the picture?");
 *     nvlm_request_add_image_pixels(request, frame, width, height, stride, NVLM_PIXEL_BGR);
 *     nvlm_result* result = NULL;
 *     int status = nvlm_session_generate(session, request, print_piece, NULL, &result);
 *     ...
 *     nvlm_result_destroy(result);
 *     nvlm_request_destroy(request);
 *     nvlm_session_close(session);
 *
 * Conventions (after ONNX Runtime GenAI's and llama.cpp mtmd.h's C APIs):
 *
 * - Objects are opaque handles with create/destroy pairs: nvlm_session (a loaded bundle),
 *   nvlm_request (a prompt, images and generation parameters), nvlm_result (a finished answer),
 *   nvlm_chat (a conversation on a session).
 *   Destroy functions accept NULL and ignore handles that are not live (no double-free crash).
 * - Every call that can fail returns an nvlm_status (NVLM_OK = 0). Out-parameters are set to NULL
 *   first and written only on success. Errors never abort the process: no exception of the embedded
 *   Python interpreter crosses this boundary.
 * - Error text: nvlm_last_error() is the message of the latest failed call on the calling thread;
 *   nvlm_session_last_error() the latest failed call on a session. Both are one line saying what
 *   went wrong, why and what to do, and stay valid until the next failing call (on that thread,
 *   respectively that session) or until the session is closed.
 * - Strings are UTF-8 and NUL-terminated. Strings and buffers passed IN are copied before the call
 *   returns; the caller keeps ownership. Pointers handed OUT are owned by the library and live as
 *   long as the object they came from (documented per function).
 *
 * Thread safety: every function may be called from any thread. A session serialises its requests
 * with an internal lock: concurrent nvlm_session_generate calls on one session run one after the
 * other. For parallel requests open one session per thread (each holds its own copy of the model).
 * A request or result must not be modified by one thread while another uses it; a request may be
 * read by several concurrent generate calls. The token callback runs on the thread that called
 * nvlm_session_generate, with that session locked: from inside it, do not generate on or close the
 * same session (such calls return NVLM_ERR_INVALID_ARGUMENT).
 *
 * Runtime environment: the library embeds the Python interpreter of the environment it was built
 * from (`nvlm-export capi build`), which must stay installed. It starts that interpreter on the
 * first call, finding the environment's packages by itself; NVLM_PYTHON=/path/to/bin/python
 * selects another environment with nvlm-export installed. If the host process already runs
 * Python, that interpreter is used.
 */
#ifndef NVLM_H
#define NVLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped when a declaration in this header changes incompatibly. */
#define NVLM_API_VERSION 1

/* ---- status codes ------------------------------------------------------------------------- */

typedef enum nvlm_status {
    NVLM_OK = 0,
    NVLM_ERR_INVALID_ARGUMENT = 1, /* NULL or dead handle, bad option, bad parameter value */
    NVLM_ERR_BUNDLE = 2,           /* bundle missing, corrupt or from an incompatible exporter */
    NVLM_ERR_IMAGE = 3,            /* image cannot be decoded, is empty or too large */
    NVLM_ERR_PROMPT = 4,           /* prompt does not fit the context or the images */
    NVLM_ERR_CANCELLED = 5,        /* the token callback returned non-zero */
    NVLM_ERR_RUNTIME = 6,          /* the inference backend failed or is not installed */
    NVLM_ERR_OUT_OF_MEMORY = 7,
    NVLM_ERR_PYTHON = 8,           /* the embedded interpreter or nvlm_export cannot start */
    NVLM_ERR_INTERNAL = 9          /* a bug: please report it with nvlm_last_error() */
} nvlm_status;

/* A static English name for a status ("NVLM_ERR_IMAGE"); never NULL. */
const char* nvlm_status_name(int status);

/* The message of the latest failed call on the calling thread ("" if none). Valid until the
 * next failing call on this thread. */
const char* nvlm_last_error(void);

/* The nvlm-export version the library was built from, e.g. "0.1.0". Static string. */
const char* nvlm_version(void);

/* ---- session: a loaded bundle ------------------------------------------------------------- */

typedef struct nvlm_session nvlm_session;

/* Load the bundle directory written by `nvlm-export export`.
 * options: NULL or "" for defaults, else "key=value" pairs separated by ';':
 *   backend=CHOICE                 inference backend (default onnxruntime): onnxruntime,
 *                                  openvino, tensorrt or auto (per graph, the measured fastest
 *                                  installed), optionally with graph=backend pairs, e.g.
 *                                  "onnxruntime,vision=openvino,prefill=openvino" (prefill: the
 *                                  decoder's prompt calls); as the CLI's --backend writes it
 *   threads=N                      ONNX Runtime intra-op threads (default: all cores)
 *   providers=A,B                  ONNX Runtime execution providers in priority order
 *                                  (default CPUExecutionProvider)
 *   optimization_level=L           ONNX Runtime graph optimisation: disable|basic|extended|all
 *   verify_hashes=1                check every bundle file's SHA-256 against the manifest
 *                                  (reads the whole bundle; sizes are always checked)
 *   feature_cache_bytes=N          byte budget of the image-feature cache shared by the
 *                                  session's requests and chats (default 256 MiB; 0 = off)
 *   prefix_cache_bytes=N           byte budget of the kept prompt keys/values that a request
 *                                  sharing their start reuses (default 256 MiB; 0 = off)
 * Unknown keys are refused (NVLM_ERR_INVALID_ARGUMENT). On success *out_session is a new session
 * the caller closes with nvlm_session_close. */
int nvlm_session_open(const char* bundle_path, const char* options, nvlm_session** out_session);

/* Release the session and its model. NULL is ignored. Waits for a running request to finish. */
void nvlm_session_close(nvlm_session* session);

/* The message of the latest failed call on this session ("" if none); owned by the session,
 * valid until its next failing call or nvlm_session_close. Never NULL. */
const char* nvlm_session_last_error(const nvlm_session* session);

/* ---- request: prompt, images and generation parameters ------------------------------------ */

typedef struct nvlm_request nvlm_request;

typedef enum nvlm_pixel_format {
    NVLM_PIXEL_RGB = 0,  /* 3 bytes per pixel */
    NVLM_PIXEL_BGR = 1,  /* 3 bytes per pixel (OpenCV's default) */
    NVLM_PIXEL_RGBA = 2, /* 4 bytes per pixel; transparency is composited on white */
    NVLM_PIXEL_BGRA = 3, /* 4 bytes per pixel; transparency is composited on white */
    NVLM_PIXEL_GRAY = 4  /* 1 byte per pixel */
} nvlm_pixel_format;

/* A new empty request: greedy decoding, at most 128 new tokens, no images. Destroy it with
 * nvlm_request_destroy; it may be reused for any number of nvlm_session_generate calls. */
int nvlm_request_create(nvlm_request** out_request);
void nvlm_request_destroy(nvlm_request* request);

/* The question (required). It goes into the bundle's chat template; each "<image>" in it is
 * replaced by the next image in order, and a prompt without "<image>" gets the images first. */
int nvlm_request_set_prompt(nvlm_request* request, const char* prompt);

/* Replace the chat template's default system message (NULL restores the default). */
int nvlm_request_set_system(nvlm_request* request, const char* system);

/* raw != 0: the prompt is fully formed and trusted; no chat template is applied and its special
 * tokens are honoured. Otherwise prompt and system text are data: special-token strings in them
 * are tokenized as plain text, never as control or image tokens. */
int nvlm_request_set_raw(nvlm_request* request, int raw);

/* Refuse image files and encoded images added after this call that are larger than max_bytes
 * (NVLM_ERR_IMAGE), before a byte is read. 0 restores the default, 64 MiB. */
int nvlm_request_set_max_image_bytes(nvlm_request* request, uint64_t max_bytes);

/* Append an encoded image (JPEG, PNG, WebP, ...). It is decoded now, so a corrupt or truncated
 * image fails here with NVLM_ERR_IMAGE. The bytes are copied. */
int nvlm_request_add_image_bytes(nvlm_request* request, const void* data, size_t size);

/* Append an image file, decoded now (NVLM_ERR_IMAGE if it is missing or not an image). */
int nvlm_request_add_image_file(nvlm_request* request, const char* path);

/* Append a raw pixel buffer, e.g. a camera frame, without re-encoding it. Row r starts at
 * pixels + r * stride_bytes; stride_bytes >= width * bytes per pixel (padding is skipped), and the
 * buffer holds at least stride_bytes * (height - 1) + width * bytes per pixel bytes. Copied. */
int nvlm_request_add_image_pixels(nvlm_request* request, const uint8_t* pixels, int32_t width,
                                  int32_t height, int32_t stride_bytes, nvlm_pixel_format format);

/* Remove every image. */
int nvlm_request_clear_images(nvlm_request* request);

/* Stop after this many new tokens (>= 1; default 128). */
int nvlm_request_set_max_new_tokens(nvlm_request* request, int32_t max_new_tokens);

/* temperature 0 = greedy (default); > 0 samples among the top_k likeliest tokens (0 = all) within
 * nucleus mass top_p (0 < top_p <= 1). Invalid values are refused here. */
int nvlm_request_set_sampling(nvlm_request* request, float temperature, int32_t top_k,
                              float top_p);

/* Make sampling reproducible (default: a fresh random seed per request). */
int nvlm_request_set_seed(nvlm_request* request, uint64_t seed);

/* Stop when this text appears in the answer (it is not included); may be called several times. */
int nvlm_request_add_stop(nvlm_request* request, const char* stop);

/* Tile budget per image (fewer tiles: faster, less detail); 0 = the bundle's maximum. */
int nvlm_request_set_max_tiles(nvlm_request* request, int32_t max_tiles);

/* ---- generation --------------------------------------------------------------------------- */

typedef struct nvlm_result nvlm_result;

/* Called once per generated token, in order. `piece` is the text this token completes (UTF-8,
 * possibly "" while a multi-byte character or a possible stop string is held back); the pieces
 * joined equal the result's text. `piece` is valid only during the call. Return 0 to continue,
 * non-zero to cancel: no further callbacks follow and generate returns NVLM_ERR_CANCELLED. */
typedef int (*nvlm_token_callback)(const char* piece, int32_t token_id, void* user_data);

/* Answer `request` with `session`. on_token may be NULL (no streaming). out_result may be NULL if
 * the caller only streams; otherwise on success *out_result is a new result the caller destroys.
 * Blocks until the answer is complete, cancelled or failed. */
int nvlm_session_generate(nvlm_session* session, const nvlm_request* request,
                          nvlm_token_callback on_token, void* user_data, nvlm_result** out_result);

/* ---- chat: a conversation about images ---------------------------------------------------- */

typedef struct nvlm_chat nvlm_chat;

/* A new conversation on `session`. Turns accumulate in the bundle's chat template, and the
 * keys/values of earlier turns are kept, so a follow-up question prefills only its own tokens
 * and encodes only its own new images. system: NULL for the template's default system message;
 * max_tiles: the tile budget of every image of the conversation, 0 = the bundle's maximum.
 * Destroy the chat with nvlm_chat_destroy, before closing its session: a chat whose session was
 * closed refuses to ask (NVLM_ERR_INVALID_ARGUMENT) but must still be destroyed. */
int nvlm_chat_create(nvlm_session* session, const char* system, int32_t max_tiles,
                     nvlm_chat** out_chat);
void nvlm_chat_destroy(nvlm_chat* chat);

/* Ask the next question: the request's prompt, its images (they join this turn; "<image>" in the
 * prompt places them, else they come first) and its generation parameters. Its system message,
 * tile budget and raw mode must be left unset (they belong to the chat). Streams like
 * nvlm_session_generate and takes the session's lock the same way.
 * When the answer is complete (NVLM_OK) the question and the answer join the conversation. A turn
 * that does not complete — cancelled by the callback (NVLM_ERR_CANCELLED) or failed — is dropped:
 * the conversation is exactly as it was before it, and the next question follows the last
 * completed turn. A question that would overflow the context is refused (NVLM_ERR_PROMPT, with the
 * tokens used in the message); nothing is truncated: reset the chat or start another. */
int nvlm_chat_ask(nvlm_chat* chat, const nvlm_request* request, nvlm_token_callback on_token,
                  void* user_data, nvlm_result** out_result);

/* Forget every turn and image (the session's caches are kept). */
int nvlm_chat_reset(nvlm_chat* chat);

/* The completed turns (question + answer pairs) and the tokens of the conversation so far. */
int nvlm_chat_get_length(const nvlm_chat* chat, int32_t* out_turns, int32_t* out_tokens);

/* ---- result ------------------------------------------------------------------------------- */

typedef struct nvlm_timings {
    double prepare_seconds;             /* image decoding, tiling, prompt assembly */
    double vision_seconds;              /* the vision encoder */
    double splice_seconds;              /* embeddings with image features spliced in */
    double prefill_seconds;             /* the decoder over the prompt */
    double decode_seconds;              /* every further decoder step */
    double time_to_first_token_seconds; /* from the start of the request */
    double decode_tokens_per_second;
} nvlm_timings;

/* Getters: the pointers returned are owned by the result and valid until nvlm_result_destroy.
 * Given a NULL or dead handle they return NULL / 0 and set nvlm_last_error(). */
const char* nvlm_result_text(const nvlm_result* result);
/* "eos" (end-of-turn token), "stop" (a stop string) or "length" (token budget or context). */
const char* nvlm_result_finish_reason(const nvlm_result* result);
/* The generated token ids (including a final end-of-turn token); *out_count gets their number. */
const int32_t* nvlm_result_token_ids(const nvlm_result* result, size_t* out_count);
/* The number of prompt tokens, image tokens included (for a chat turn: the whole history). */
int32_t nvlm_result_prompt_tokens(const nvlm_result* result);
/* How many of those were not prefilled again: their keys/values came from the chat's earlier
 * turns or from the session's prefix cache (a request sharing the start of an earlier one). */
int32_t nvlm_result_reused_tokens(const nvlm_result* result);
int nvlm_result_get_timings(const nvlm_result* result, nvlm_timings* out_timings);
void nvlm_result_destroy(nvlm_result* result);

/* ---- diagnostics -------------------------------------------------------------------------- */

/* How many sessions, requests and results are alive (any pointer may be NULL); for leak checks. */
int nvlm_debug_live_objects(int32_t* sessions, int32_t* requests, int32_t* results);
/* How many chats are alive. */
int nvlm_debug_live_chats(int32_t* chats);

#ifdef __cplusplus
}
#endif

#endif /* NVLM_H */
