/* Greedy continuation of a prompt through the rwkv-wgpu C API.
 *
 *   cc -std=c11 -I include examples/c/generate.c -L target/release -lrwkv_wgpu \
 *      -Wl,-rpath,target/release -o generate
 *   ./generate assets/austen-rwkv7/austen-rwkv7-fp16.safetensors \
 *      assets/austen-rwkv7/tokenizer.json "It is a truth universally acknowledged"
 *
 * Arguments: MODEL TOKENIZER PROMPT [MAX_TOKENS (default 100)]. Prints the
 * continuation (not the prompt) to stdout as it is generated. */
#include <stdio.h>
#include <stdlib.h>

#include "rwkv.h"

/* Prints a failed call's status and message and exits. */
static void check(rwkv_status status, const char *what) {
    if (status != RWKV_OK) {
        fprintf(stderr, "generate: %s: %s: %s\n", what, rwkv_status_name(status), rwkv_last_error());
        exit(1);
    }
}

/* Called with each piece of text as soon as it is whole UTF-8. */
static int32_t print_piece(const char *piece, size_t len, void *user_data) {
    (void)user_data;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    return 0; /* nonzero would stop the generation here */
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: %s MODEL TOKENIZER PROMPT [MAX_TOKENS]\n", argv[0]);
        return 2;
    }
    unsigned long max_tokens = argc == 5 ? strtoul(argv[4], NULL, 10) : 100;

    /* The GPU, then the model on it (weights, tokenizer, engine). */
    rwkv_context *ctx = NULL;
    check(rwkv_context_create(NULL, &ctx), "opening the GPU");
    rwkv_model *model = NULL;
    check(rwkv_model_load(ctx, argv[1], argv[2], NULL, &model), "loading the model");

    /* A session reads the prompt into its state... */
    rwkv_session *session = NULL;
    check(rwkv_session_create(model, &session), "creating a session");
    check(rwkv_session_feed_text(session, argv[3], NULL), "reading the prompt");

    /* ...and generates from it: temperature 0 is greedy. */
    rwkv_generate_options opts = rwkv_generate_options_default();
    opts.temperature = 0.0f;
    opts.max_tokens = (uint32_t)max_tokens;
    rwkv_generation result;
    check(rwkv_session_generate(session, &opts, print_piece, NULL, &result), "generating");
    printf("\n");
    fprintf(stderr, "[%u tokens]\n", result.n_tokens);

    check(rwkv_session_free(session), "freeing the session");
    check(rwkv_model_free(model), "freeing the model");
    check(rwkv_context_free(ctx), "freeing the context");
    return 0;
}
