/*
 * The C side of libnvlm.so: the public functions of nvlm.h.
 *
 * cffi pastes this file into the library's source (after Python.h) with two macros defined by
 * the build: NVLM_VERSION_STRING, NVLM_PYTHON_EXECUTABLE (the interpreter of the environment the
 * library was built from) and NVLM_LIBPYTHON (the soname of the libpython it links). Each public function starts the embedded interpreter if needed,
 * then calls its Python implementation in nvlm_export/capi/embedded.py (the `nvlm_py_*`
 * functions, cffi `extern "Python"` callbacks).
 *
 * Why C wrappers instead of exporting the Python functions directly: when the embedded Python
 * cannot start, cffi makes an `extern "Python"` function return 0 — which is NVLM_OK. The wrappers
 * check that the interpreter is up first and return NVLM_ERR_PYTHON instead. They also start the
 * interpreter ourselves so it finds the build environment's packages without PYTHONPATH.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "nvlm.h"

/* ---- the Python implementations (defined by cffi further down) ---------------------------- */

static int nvlm_py_ready(void);
static int nvlm_py_session_open(const char*, const char*, nvlm_session**);
static void nvlm_py_session_close(nvlm_session*);
static const char* nvlm_py_session_last_error(const nvlm_session*);
static int nvlm_py_request_create(nvlm_request**);
static void nvlm_py_request_destroy(nvlm_request*);
static int nvlm_py_request_set_text(nvlm_request*, int, const char*);
static int nvlm_py_request_set_raw(nvlm_request*, int);
static int nvlm_py_request_add_image_bytes(nvlm_request*, const void*, size_t);
static int nvlm_py_request_add_image_file(nvlm_request*, const char*);
static int nvlm_py_request_add_image_pixels(nvlm_request*, const uint8_t*, int32_t, int32_t,
                                            int32_t, int);
static int nvlm_py_request_clear_images(nvlm_request*);
static int nvlm_py_request_set_max_new_tokens(nvlm_request*, int32_t);
static int nvlm_py_request_set_sampling(nvlm_request*, float, int32_t, float);
static int nvlm_py_request_set_seed(nvlm_request*, uint64_t);
static int nvlm_py_request_set_max_tiles(nvlm_request*, int32_t);
static int nvlm_py_request_set_max_image_bytes(nvlm_request*, uint64_t);
static int nvlm_py_session_generate(nvlm_session*, const nvlm_request*, nvlm_token_callback,
                                    void*, nvlm_result**);
static const char* nvlm_py_result_text(const nvlm_result*);
static const char* nvlm_py_result_finish_reason(const nvlm_result*);
static const int32_t* nvlm_py_result_token_ids(const nvlm_result*, size_t*);
static int32_t nvlm_py_result_prompt_tokens(const nvlm_result*);
static int nvlm_py_result_get_timings(const nvlm_result*, nvlm_timings*);
static void nvlm_py_result_destroy(nvlm_result*);
static int nvlm_py_debug_live_objects(int32_t*, int32_t*, int32_t*);

/* Which text field nvlm_py_request_set_text sets (one Python entry point for the four). */
enum { NVLM_TEXT_PROMPT = 0, NVLM_TEXT_SYSTEM = 1, NVLM_TEXT_STOP = 2 };

/* ---- the thread's last error (also set from Python through nvlm_set_thread_error) ---------- */

static _Thread_local char* thread_error = NULL;

static void nvlm_set_thread_error(const char* message) {
    free(thread_error);
    thread_error = message ? strdup(message) : NULL;
}

const char* nvlm_last_error(void) { return thread_error ? thread_error : ""; }

/* ---- starting the embedded interpreter ---------------------------------------------------- */

static pthread_once_t python_once = PTHREAD_ONCE_INIT;
static int python_status = NVLM_ERR_PYTHON;
static const char* python_error = "The embedded Python interpreter did not start";

/* Start the interpreter as if `executable` ran: Python then finds its standard library and, for a
 * virtual environment, its pyvenv.cfg and site-packages, exactly as that executable would. */
static int initialize_python(const char* executable) {
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0; /* the host application owns SIGINT and friends */
    config.parse_argv = 0;
    PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, executable);
    if (!PyStatus_Exception(status))
        status = PyConfig_SetBytesString(&config, &config.executable, executable);
    if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) return -1;
    PyEval_SaveThread(); /* release the GIL: every call takes it through PyGILState_Ensure */
    return 0;
}

static void start_python(void) {
    /* A host that dlopen()s libnvlm with RTLD_LOCAL hides libpython's symbols from the extension
     * modules Python loads later (numpy, onnxruntime); make them global. No-op when linked. */
    dlopen(NVLM_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
    if (!Py_IsInitialized()) { /* else the host process runs Python already: use it */
        const char* executable = getenv("NVLM_PYTHON");
        if (executable == NULL || executable[0] == '\0') executable = NVLM_PYTHON_EXECUTABLE;
        if (initialize_python(executable) != 0) {
            python_error =
                "The embedded Python interpreter did not start: its configuration was refused. "
                "Check that NVLM_PYTHON (or the environment libnvlm was built from) exists";
            return;
        }
    }
    /* The first Python call runs cffi's init code, which imports nvlm_export; if that fails,
     * cffi prints the traceback on stderr and the call returns 0. */
    if (nvlm_py_ready() != 1) {
        python_error =
            "The embedded Python cannot import nvlm_export: the traceback is on stderr. Rebuild "
            "libnvlm with `nvlm-export capi build` in an environment where nvlm-export is "
            "installed, or point NVLM_PYTHON at that environment's python";
        return;
    }
    python_status = NVLM_OK;
}

/* Every public entry point starts with this: 0 when Python is ready, else an nvlm_status. */
static int enter(void) {
    pthread_once(&python_once, start_python);
    if (python_status != NVLM_OK) nvlm_set_thread_error(python_error);
    return python_status;
}

#define ENTER_OR_RETURN(failure) \
    do {                         \
        if (enter() != NVLM_OK) return (failure); \
    } while (0)

#define ENTER_OR_RETURN_STATUS()        \
    do {                                \
        int status_ = enter();          \
        if (status_ != NVLM_OK) return status_; \
    } while (0)

/* ---- static information ------------------------------------------------------------------- */

const char* nvlm_version(void) { return NVLM_VERSION_STRING; }

const char* nvlm_status_name(int status) {
    switch (status) {
        case NVLM_OK: return "NVLM_OK";
        case NVLM_ERR_INVALID_ARGUMENT: return "NVLM_ERR_INVALID_ARGUMENT";
        case NVLM_ERR_BUNDLE: return "NVLM_ERR_BUNDLE";
        case NVLM_ERR_IMAGE: return "NVLM_ERR_IMAGE";
        case NVLM_ERR_PROMPT: return "NVLM_ERR_PROMPT";
        case NVLM_ERR_CANCELLED: return "NVLM_ERR_CANCELLED";
        case NVLM_ERR_RUNTIME: return "NVLM_ERR_RUNTIME";
        case NVLM_ERR_OUT_OF_MEMORY: return "NVLM_ERR_OUT_OF_MEMORY";
        case NVLM_ERR_PYTHON: return "NVLM_ERR_PYTHON";
        case NVLM_ERR_INTERNAL: return "NVLM_ERR_INTERNAL";
        default: return "NVLM_ERR_UNKNOWN";
    }
}

/* ---- sessions ----------------------------------------------------------------------------- */

int nvlm_session_open(const char* bundle_path, const char* options, nvlm_session** out_session) {
    if (out_session) *out_session = NULL;
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_session_open(bundle_path, options, out_session);
}

void nvlm_session_close(nvlm_session* session) {
    if (session == NULL || enter() != NVLM_OK) return;
    nvlm_py_session_close(session);
}

const char* nvlm_session_last_error(const nvlm_session* session) {
    ENTER_OR_RETURN(python_error);
    const char* message = nvlm_py_session_last_error(session);
    return message ? message : "";
}

int nvlm_session_generate(nvlm_session* session, const nvlm_request* request,
                          nvlm_token_callback on_token, void* user_data, nvlm_result** out_result) {
    if (out_result) *out_result = NULL;
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_session_generate(session, request, on_token, user_data, out_result);
}

/* ---- requests ----------------------------------------------------------------------------- */

int nvlm_request_create(nvlm_request** out_request) {
    if (out_request) *out_request = NULL;
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_create(out_request);
}

void nvlm_request_destroy(nvlm_request* request) {
    if (request == NULL || enter() != NVLM_OK) return;
    nvlm_py_request_destroy(request);
}

int nvlm_request_set_prompt(nvlm_request* request, const char* prompt) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_set_text(request, NVLM_TEXT_PROMPT, prompt);
}

int nvlm_request_set_system(nvlm_request* request, const char* system) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_set_text(request, NVLM_TEXT_SYSTEM, system);
}

int nvlm_request_add_stop(nvlm_request* request, const char* stop) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_set_text(request, NVLM_TEXT_STOP, stop);
}

int nvlm_request_set_raw(nvlm_request* request, int raw) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_set_raw(request, raw);
}

int nvlm_request_add_image_bytes(nvlm_request* request, const void* data, size_t size) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_add_image_bytes(request, data, size);
}

int nvlm_request_add_image_file(nvlm_request* request, const char* path) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_add_image_file(request, path);
}

int nvlm_request_add_image_pixels(nvlm_request* request, const uint8_t* pixels, int32_t width,
                                  int32_t height, int32_t stride_bytes, nvlm_pixel_format format) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_add_image_pixels(request, pixels, width, height, stride_bytes,
                                            (int)format);
}

int nvlm_request_clear_images(nvlm_request* request) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_clear_images(request);
}

int nvlm_request_set_max_new_tokens(nvlm_request* request, int32_t max_new_tokens) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_set_max_new_tokens(request, max_new_tokens);
}

int nvlm_request_set_sampling(nvlm_request* request, float temperature, int32_t top_k,
                              float top_p) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_set_sampling(request, temperature, top_k, top_p);
}

int nvlm_request_set_seed(nvlm_request* request, uint64_t seed) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_set_seed(request, seed);
}

int nvlm_request_set_max_tiles(nvlm_request* request, int32_t max_tiles) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_set_max_tiles(request, max_tiles);
}

int nvlm_request_set_max_image_bytes(nvlm_request* request, uint64_t max_bytes) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_request_set_max_image_bytes(request, max_bytes);
}

/* ---- results ------------------------------------------------------------------------------ */

const char* nvlm_result_text(const nvlm_result* result) {
    ENTER_OR_RETURN(NULL);
    return nvlm_py_result_text(result);
}

const char* nvlm_result_finish_reason(const nvlm_result* result) {
    ENTER_OR_RETURN(NULL);
    return nvlm_py_result_finish_reason(result);
}

const int32_t* nvlm_result_token_ids(const nvlm_result* result, size_t* out_count) {
    if (out_count) *out_count = 0;
    ENTER_OR_RETURN(NULL);
    return nvlm_py_result_token_ids(result, out_count);
}

int32_t nvlm_result_prompt_tokens(const nvlm_result* result) {
    ENTER_OR_RETURN(0);
    return nvlm_py_result_prompt_tokens(result);
}

int nvlm_result_get_timings(const nvlm_result* result, nvlm_timings* out_timings) {
    if (out_timings) memset(out_timings, 0, sizeof(*out_timings));
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_result_get_timings(result, out_timings);
}

void nvlm_result_destroy(nvlm_result* result) {
    if (result == NULL || enter() != NVLM_OK) return;
    nvlm_py_result_destroy(result);
}

/* ---- diagnostics -------------------------------------------------------------------------- */

int nvlm_debug_live_objects(int32_t* sessions, int32_t* requests, int32_t* results) {
    ENTER_OR_RETURN_STATUS();
    return nvlm_py_debug_live_objects(sessions, requests, results);
}
