/*
 * nvlm_example: ask a question about one image with an exported bundle, streaming the answer.
 *
 *   nvlm_example BUNDLE IMAGE "What is in the picture?"              # encoded image (JPEG, PNG...)
 *   nvlm_example --pixels --bgr --pad 7 BUNDLE IMAGE.ppm "Describe it."  # raw pixels, as from a camera
 *
 * Options:
 *   --pixels        read IMAGE as a binary PPM (P6) and pass its raw pixels (no re-encoding);
 *   --bgr           with --pixels: hand the pixels over in BGR order (like an OpenCV frame);
 *   --pad N         with --pixels: pad every row with N bytes, so the row stride is not width*3;
 *   --max-new-tokens N, --threads N.
 *
 * The answer goes to stdout as it is generated; the finish reason, token counts and timings to
 * stderr. The exit code is 0 or the nvlm_status of the first failing call.
 *
 * Build:  make   (uses pkg-config; see Makefile)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nvlm.h"

typedef struct options {
    const char* bundle;
    const char* image;
    const char* prompt;
    int pixels;
    int bgr;
    int pad;
    int max_new_tokens;
    int threads;
} options;

/* A decoded image as a camera would deliver it: rows of `stride` bytes. */
typedef struct frame {
    uint8_t* data;
    int32_t width, height, stride;
} frame;

static int print_piece(const char* piece, int32_t token_id, void* user_data) {
    (void)token_id;
    int* count = (int*)user_data;
    *count += 1;
    fputs(piece, stdout);
    fflush(stdout);
    return 0; /* non-zero would cancel the generation */
}

static int fail(const char* what, int status) {
    fprintf(stderr, "error: %s failed (%s): %s\n", what, nvlm_status_name(status),
            nvlm_last_error());
    return status;
}

static unsigned char* read_file(const char* path, size_t* size) {
    FILE* file = fopen(path, "rb");
    if (!file) return NULL;
    fseek(file, 0, SEEK_END);
    long length = ftell(file);
    fseek(file, 0, SEEK_SET);
    unsigned char* data = malloc(length > 0 ? (size_t)length : 1);
    *size = data ? fread(data, 1, (size_t)length, file) : 0;
    fclose(file);
    return data;
}

/* Read a binary PPM (P6, maxval 255) into a frame with `pad` bytes after every row. */
static int read_ppm(const char* path, int pad, int bgr, frame* out) {
    FILE* file = fopen(path, "rb");
    int width, height, maxval;
    if (!file || fscanf(file, "P6 %d %d %d", &width, &height, &maxval) != 3 || maxval != 255) {
        if (file) fclose(file);
        return -1;
    }
    fgetc(file); /* the single whitespace byte after the header */
    out->width = width;
    out->height = height;
    out->stride = width * 3 + pad;
    out->data = calloc((size_t)out->stride * height, 1);
    for (int y = 0; y < height; y++) {
        uint8_t* row = out->data + (size_t)y * out->stride;
        if (fread(row, 3, (size_t)width, file) != (size_t)width) {
            fclose(file);
            return -1;
        }
        for (int x = 0; bgr && x < width; x++) { /* swap R and B */
            uint8_t red = row[3 * x];
            row[3 * x] = row[3 * x + 2];
            row[3 * x + 2] = red;
        }
    }
    fclose(file);
    return 0;
}

static int add_image(nvlm_request* request, const options* opts) {
    if (opts->pixels) {
        frame image = {0};
        if (read_ppm(opts->image, opts->pad, opts->bgr, &image) != 0) {
            fprintf(stderr, "error: %s is not a binary PPM (P6, maxval 255)\n", opts->image);
            free(image.data);
            return NVLM_ERR_IMAGE;
        }
        int status = nvlm_request_add_image_pixels(request, image.data, image.width, image.height,
                                                   image.stride,
                                                   opts->bgr ? NVLM_PIXEL_BGR : NVLM_PIXEL_RGB);
        free(image.data); /* the library copied the pixels */
        return status;
    }
    size_t size = 0;
    unsigned char* data = read_file(opts->image, &size);
    if (!data) {
        fprintf(stderr, "error: cannot read %s\n", opts->image);
        return NVLM_ERR_IMAGE;
    }
    int status = nvlm_request_add_image_bytes(request, data, size);
    free(data);
    return status;
}

static void report(const nvlm_result* result, int pieces) {
    size_t count = 0;
    nvlm_result_token_ids(result, &count);
    nvlm_timings t;
    nvlm_result_get_timings(result, &t);
    fprintf(stderr,
            "finish: %s, %zu tokens (%d pieces), prompt %d tokens\n"
            "seconds: prepare %.3f vision %.3f prefill %.3f decode %.3f, first token %.3f, "
            "%.1f tokens/s\n",
            nvlm_result_finish_reason(result), count, pieces, nvlm_result_prompt_tokens(result),
            t.prepare_seconds, t.vision_seconds, t.prefill_seconds, t.decode_seconds,
            t.time_to_first_token_seconds, t.decode_tokens_per_second);
}

static int run(const options* opts) {
    char session_options[64] = "";
    if (opts->threads > 0) snprintf(session_options, sizeof session_options, "threads=%d", opts->threads);

    nvlm_session* session = NULL;
    nvlm_request* request = NULL;
    nvlm_result* result = NULL;
    int pieces = 0;
    int status = nvlm_session_open(opts->bundle, session_options, &session);
    if (status != NVLM_OK) return fail("nvlm_session_open", status);

    if ((status = nvlm_request_create(&request)) != NVLM_OK ||
        (status = nvlm_request_set_prompt(request, opts->prompt)) != NVLM_OK ||
        (status = nvlm_request_set_max_new_tokens(request, opts->max_new_tokens)) != NVLM_OK) {
        fail("building the request", status);
    } else if ((status = add_image(request, opts)) != NVLM_OK) {
        fail("adding the image", status);
    } else if ((status = nvlm_session_generate(session, request, print_piece, &pieces, &result)) !=
               NVLM_OK) {
        fprintf(stderr, "\nerror: generation failed (%s): %s\n", nvlm_status_name(status),
                nvlm_session_last_error(session));
    } else {
        fputc('\n', stdout);
        report(result, pieces);
    }
    nvlm_result_destroy(result); /* every destroy function accepts NULL */
    nvlm_request_destroy(request);
    nvlm_session_close(session);
    return status;
}

static int usage(void) {
    fprintf(stderr,
            "usage: nvlm_example [--pixels [--bgr] [--pad N]] [--max-new-tokens N] [--threads N]"
            " BUNDLE IMAGE PROMPT\n");
    return 2;
}

int main(int argc, char** argv) {
    options opts = {.max_new_tokens = 64};
    const char* positional[3];
    int count = 0;
    for (int i = 1; i < argc; i++) {
        const char* arg = argv[i];
        int has_value = i + 1 < argc;
        if (strcmp(arg, "--pixels") == 0) opts.pixels = 1;
        else if (strcmp(arg, "--bgr") == 0) opts.bgr = 1;
        else if (strcmp(arg, "--pad") == 0 && has_value) opts.pad = atoi(argv[++i]);
        else if (strcmp(arg, "--max-new-tokens") == 0 && has_value)
            opts.max_new_tokens = atoi(argv[++i]);
        else if (strcmp(arg, "--threads") == 0 && has_value) opts.threads = atoi(argv[++i]);
        else if (arg[0] == '-' || count == 3) return usage();
        else positional[count++] = arg;
    }
    if (count != 3) return usage();
    opts.bundle = positional[0];
    opts.image = positional[1];
    opts.prompt = positional[2];
    return run(&opts);
}
