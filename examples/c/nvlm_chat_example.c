/*
 * nvlm_chat_example: a conversation about one image, streaming each answer.
 *
 *   nvlm_chat_example BUNDLE IMAGE "What colour is it?" "And its shape?"  # questions as arguments
 *   nvlm_chat_example BUNDLE IMAGE < questions.txt                         # or one per line on stdin
 *
 * The image joins the first question; every later question is about the same conversation, so
 * it prefills only its own tokens (the keys/values of earlier turns are kept). On stdin, a line
 * "/reset" starts a new conversation (the image joins the next question again).
 *
 * Options: --max-new-tokens N, --threads N.
 *
 * Answers go to stdout, one per turn, each followed by a newline; per-turn token counts and
 * timings go to stderr. The exit code is 0 or the nvlm_status of the first failing call.
 *
 * Build:  make   (uses pkg-config; see Makefile)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nvlm.h"

#define MAX_LINE 4096 /* longest question read from stdin */

typedef struct options {
    const char* bundle;
    const char* image;
    char** questions; /* from the command line; NULL: read stdin */
    int num_questions;
    int max_new_tokens;
    int threads;
} options;

/* Everything the conversation owns; conversation_close frees it in reverse order. */
typedef struct conversation {
    nvlm_session* session;
    nvlm_chat* chat;
    nvlm_request* turn;
    int turns_asked;
    int image_pending; /* the image joins the next question */
} conversation;

static int print_piece(const char* piece, int32_t token_id, void* user_data) {
    (void)token_id;
    (void)user_data;
    fputs(piece, stdout);
    fflush(stdout);
    return 0; /* non-zero would cancel the turn; the conversation would stay as it was */
}

/* nvlm_last_error(): the one-line message (what, why, what to do) of this thread's last failure. */
static int fail(const char* what, int status) {
    fprintf(stderr, "error: %s failed (%s): %s\n", what, nvlm_status_name(status),
            nvlm_last_error());
    return status;
}

static int conversation_open(conversation* c, const options* opts) {
    char session_options[64] = "";
    if (opts->threads > 0)
        snprintf(session_options, sizeof session_options, "threads=%d", opts->threads);
    int status = nvlm_session_open(opts->bundle, session_options, &c->session);
    if (status != NVLM_OK) return fail("nvlm_session_open", status);
    /* NULL: the bundle's default system message; 0: the bundle's tile budget. */
    if ((status = nvlm_chat_create(c->session, NULL, 0, &c->chat)) != NVLM_OK)
        return fail("nvlm_chat_create", status);
    if ((status = nvlm_request_create(&c->turn)) != NVLM_OK ||
        (status = nvlm_request_set_max_new_tokens(c->turn, opts->max_new_tokens)) != NVLM_OK)
        return fail("building the request", status);
    c->image_pending = 1;
    return NVLM_OK;
}

static void conversation_close(conversation* c) {
    /* Every destroy function accepts NULL; the chat goes before its session. */
    nvlm_request_destroy(c->turn);
    nvlm_chat_destroy(c->chat);
    nvlm_session_close(c->session);
}

static void report(const nvlm_result* result, int turn) {
    nvlm_timings t;
    nvlm_result_get_timings(result, &t);
    int32_t prompt = nvlm_result_prompt_tokens(result);
    int32_t reused = nvlm_result_reused_tokens(result);
    fprintf(stderr,
            "[turn %d: %d prompt tokens, %d reused, %d prefilled; first token %.3f s "
            "(vision %.3f, prefill %.3f), %.1f tokens/s, finish %s]\n",
            turn, prompt, reused, prompt - reused, t.time_to_first_token_seconds,
            t.vision_seconds, t.prefill_seconds, t.decode_tokens_per_second,
            nvlm_result_finish_reason(result));
}

/* One turn: the question (with the image, if it is pending), the answer streamed to stdout. */
static int ask(conversation* c, const char* question, const char* image) {
    int status = nvlm_request_set_prompt(c->turn, question);
    if (status == NVLM_OK) status = nvlm_request_clear_images(c->turn);
    if (status == NVLM_OK && c->image_pending)
        status = nvlm_request_add_image_file(c->turn, image); /* decoded here */
    if (status != NVLM_OK) return fail("building the turn", status);

    nvlm_result* result = NULL;
    status = nvlm_chat_ask(c->chat, c->turn, print_piece, NULL, &result);
    fputc('\n', stdout);
    if (status != NVLM_OK) /* the turn is dropped; the conversation is as it was before it */
        return fail("nvlm_chat_ask", status);
    c->image_pending = 0;
    report(result, ++c->turns_asked);
    nvlm_result_destroy(result);
    return NVLM_OK;
}

static int reset(conversation* c) {
    int status = nvlm_chat_reset(c->chat);
    if (status != NVLM_OK) return fail("nvlm_chat_reset", status);
    c->image_pending = 1;
    c->turns_asked = 0;
    fputs("[new conversation]\n", stderr);
    return NVLM_OK;
}

/* The next question from the arguments or stdin, without its newline, in *question (NULL at the
 * end). A stdin line that does not fit `line` is refused rather than split into two questions. */
static int next_question(const options* opts, int* index, char* line, const char** question) {
    *question = NULL;
    if (opts->questions) {
        if (*index < opts->num_questions) *question = opts->questions[(*index)++];
        return NVLM_OK;
    }
    while (fgets(line, MAX_LINE, stdin)) {
        size_t length = strcspn(line, "\r\n");
        if (line[length] == '\0' && length == MAX_LINE - 1) { /* full: is there more of it? */
            int next = getc(stdin);
            if (next != '\n' && next != EOF) {
                fprintf(stderr, "error: a question on stdin is longer than %d bytes\n",
                        MAX_LINE - 1);
                return NVLM_ERR_INVALID_ARGUMENT;
            }
        }
        line[length] = '\0';
        if (length > 0) {
            *question = line;
            return NVLM_OK;
        }
    }
    return NVLM_OK;
}

static int run(const options* opts) {
    conversation c = {0};
    int status = conversation_open(&c, opts);
    char line[MAX_LINE];
    int index = 0;
    const char* question;
    while (status == NVLM_OK &&
           (status = next_question(opts, &index, line, &question)) == NVLM_OK && question) {
        status = strcmp(question, "/reset") == 0 ? reset(&c) : ask(&c, question, opts->image);
    }
    if (status == NVLM_OK) {
        int32_t turns = 0, tokens = 0;
        nvlm_chat_get_length(c.chat, &turns, &tokens);
        fprintf(stderr, "[conversation: %d turns, %d tokens]\n", turns, tokens);
    }
    conversation_close(&c);
    return status;
}

static int usage(void) {
    fprintf(stderr, "usage: nvlm_chat_example [--max-new-tokens N] [--threads N] BUNDLE IMAGE "
                    "[QUESTION...]\n       (no QUESTION: one per line on stdin, /reset starts "
                    "over)\n");
    return 2;
}

int main(int argc, char** argv) {
    options opts = {.max_new_tokens = 64};
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        int has_value = i + 1 < argc;
        if (strcmp(argv[i], "--max-new-tokens") == 0 && has_value)
            opts.max_new_tokens = atoi(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && has_value)
            opts.threads = atoi(argv[++i]);
        else
            return usage();
    }
    if (argc - i < 2) return usage();
    opts.bundle = argv[i];
    opts.image = argv[i + 1];
    if (argc - i > 2) {
        opts.questions = argv + i + 2;
        opts.num_questions = argc - i - 2;
    }
    return run(&opts);
}
