/* A chat loop through the rwkv-wgpu C API, in RWKV's chat format
 * ("User: ...\n\nAssistant: ...\n\n"), keeping the conversation in one
 * session's state: each turn reads only the new message.
 *
 *   cc -std=c11 -I include examples/c/chat.c -L target/release -lrwkv_wgpu \
 *      -Wl,-rpath,target/release -o chat
 *   ./chat assets/austen-rwkv7/austen-rwkv7-fp16.safetensors assets/austen-rwkv7/tokenizer.json
 *
 * Arguments: MODEL TOKENIZER [SEED (default 42)]. Each line of stdin is a
 * user message; the reply goes to stdout, one line per turn. Commands:
 * /reset (forget the conversation), /save FILE and /load FILE (the state). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rwkv.h"

static void fatal(rwkv_status status, const char *what) {
    fprintf(stderr, "chat: %s: %s: %s\n", what, rwkv_status_name(status), rwkv_last_error());
    exit(1);
}

static int32_t print_piece(const char *piece, size_t len, void *user_data) {
    (void)user_data;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s MODEL TOKENIZER [SEED]\n", argv[0]);
        return 2;
    }
    rwkv_status st;
    rwkv_context *ctx = NULL;
    if ((st = rwkv_context_create(NULL, &ctx)) != RWKV_OK) fatal(st, "opening the GPU");
    rwkv_model *model = NULL;
    if ((st = rwkv_model_load(ctx, argv[1], argv[2], NULL, &model)) != RWKV_OK) fatal(st, "loading the model");
    rwkv_session *session = NULL;
    if ((st = rwkv_session_create(model, &session)) != RWKV_OK) fatal(st, "creating a session");

    /* The settings of `rwkv chat`: a narrow nucleus and decayed penalties; a
     * turn ends at a blank line, which RWKV chat models write after a reply. */
    const char *stops[] = {"\n\n"};
    rwkv_generate_options opts = rwkv_generate_options_default();
    opts.max_tokens = 200;
    opts.temperature = 1.0f;
    opts.top_p = 0.5f;
    opts.presence_penalty = 0.4f;
    opts.frequency_penalty = 0.4f;
    opts.penalty_decay = 0.996f;
    opts.seed = argc == 4 ? strtoull(argv[3], NULL, 10) : 42;
    opts.stop = stops;
    opts.n_stop = 1;

    static char line[8192];
    static char turn[8192 + 64];
    int ended = 1; /* whether the last reply ended with its blank line */
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == '\0') continue;
        if (strcmp(line, "/reset") == 0) {
            if ((st = rwkv_session_reset(session)) != RWKV_OK) fatal(st, "resetting");
            ended = 1;
            continue;
        }
        if (strncmp(line, "/save ", 6) == 0 || strncmp(line, "/load ", 6) == 0) {
            int save = line[1] == 's';
            st = save ? rwkv_session_save_state(session, line + 6) : rwkv_session_load_state(session, line + 6);
            /* A bad path is reported, and the conversation goes on. */
            if (st != RWKV_OK) fprintf(stderr, "chat: %s\n", rwkv_last_error());
            continue;
        }
        /* Only the new text is read: the state holds the conversation so far. */
        snprintf(turn, sizeof turn, "%sUser: %s\n\nAssistant:", ended ? "" : "\n\n", line);
        if ((st = rwkv_session_feed_text(session, turn, NULL)) != RWKV_OK) {
            fprintf(stderr, "chat: %s\n", rwkv_last_error()); /* e.g. invalid UTF-8: skip the line */
            continue;
        }
        rwkv_generation result;
        if ((st = rwkv_session_generate(session, &opts, print_piece, NULL, &result)) != RWKV_OK) fatal(st, "generating");
        printf("\n");
        fflush(stdout);
        ended = result.stop_reason == RWKV_STOP_TEXT;
    }

    rwkv_session_free(session);
    rwkv_model_free(model);
    rwkv_context_free(ctx);
    return 0;
}
