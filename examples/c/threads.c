/* Many sessions of one model on many threads, through the rwkv-wgpu C API:
 * each thread generates on its own session, and the library reads the
 * threads' tokens in shared GPU steps. Prints the aggregate tokens/s for 1
 * thread and for THREADS threads (a benchmark; medians of runs belong in
 * docs/performance.md).
 *
 *   cc -std=c11 -O2 -pthread -I include examples/c/threads.c -L target/release -lrwkv_wgpu \
 *      -Wl,-rpath,target/release -o threads
 *   ./threads assets/austen-rwkv7/austen-rwkv7-fp16.safetensors assets/austen-rwkv7/tokenizer.json 8 128
 *
 * Arguments: MODEL TOKENIZER [THREADS (8)] [TOKENS per thread (128)]. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "rwkv.h"

typedef struct {
    rwkv_model *model;
    uint32_t tokens;
    uint64_t seed;
    uint32_t generated;
    rwkv_status status;
} worker;

static void *work(void *arg) {
    worker *w = arg;
    rwkv_session *s = NULL;
    if ((w->status = rwkv_session_create(w->model, &s)) != RWKV_OK) return NULL;
    if ((w->status = rwkv_session_feed_text(s, "It is a truth universally acknowledged", NULL)) == RWKV_OK) {
        rwkv_generate_options o = rwkv_generate_options_default();
        o.max_tokens = w->tokens;
        o.seed = w->seed;
        o.ignore_eos = true; /* every thread runs to its length */
        rwkv_generation g;
        if ((w->status = rwkv_session_generate(s, &o, NULL, NULL, &g)) == RWKV_OK) w->generated = g.n_tokens;
    }
    rwkv_session_free(s);
    return NULL;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Runs n threads at once; returns aggregate tokens/s, or -1 on an error. */
static double run(rwkv_model *model, int n, uint32_t tokens) {
    pthread_t *t = calloc((size_t)n, sizeof *t);
    worker *w = calloc((size_t)n, sizeof *w);
    double start = now();
    for (int i = 0; i < n; i++) {
        w[i] = (worker){.model = model, .tokens = tokens, .seed = (uint64_t)i};
        pthread_create(&t[i], NULL, work, &w[i]);
    }
    uint64_t total = 0;
    int ok = 1;
    for (int i = 0; i < n; i++) {
        pthread_join(t[i], NULL);
        if (w[i].status != RWKV_OK) {
            fprintf(stderr, "thread %d: %s\n", i, rwkv_status_name(w[i].status));
            ok = 0;
        }
        total += w[i].generated;
    }
    double rate = (double)total / (now() - start);
    free(t);
    free(w);
    return ok ? rate : -1.0;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: %s MODEL TOKENIZER [THREADS] [TOKENS]\n", argv[0]);
        return 2;
    }
    int threads = argc > 3 ? atoi(argv[3]) : 8;
    uint32_t tokens = argc > 4 ? (uint32_t)strtoul(argv[4], NULL, 10) : 128;
    rwkv_context *ctx = NULL;
    rwkv_model *model = NULL;
    if (rwkv_context_create(NULL, &ctx) != RWKV_OK || rwkv_model_load(ctx, argv[1], argv[2], NULL, &model) != RWKV_OK) {
        fprintf(stderr, "threads: %s\n", rwkv_last_error());
        return 1;
    }
    run(model, threads, 4); /* first use compiles the kernels */
    double one = run(model, 1, tokens);
    double many = run(model, threads, tokens);
    if (one < 0 || many < 0) return 1;
    printf("{\"threads\": %d, \"tokens_per_thread\": %u, \"one_thread_tokens_per_s\": %.1f, "
           "\"aggregate_tokens_per_s\": %.1f, \"ratio\": %.2f}\n",
           threads, tokens, one, many, many / one);
    rwkv_model_free(model);
    rwkv_context_free(ctx);
    return 0;
}
