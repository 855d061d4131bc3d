/* The C ABI's contract, checked from C: statuses for NULL, freed, foreign and
 * wrong-kind handles, invalid UTF-8, bad tokens and settings, small buffers and
 * re-entrant calls; and that what works gives the right answers (tokenize
 * round trip, logits, clone, state save/load, two threads at once).
 *
 * Run by tests/c_api.rs: abi_errors MODEL TOKENIZER TMPDIR. Prints each failed
 * check and exits 1 if any failed. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rwkv.h"

static int failures = 0;
static int checks = 0;

#define EXPECT(cond, ...)                                                   \
    do {                                                                    \
        checks++;                                                           \
        if (!(cond)) {                                                      \
            failures++;                                                     \
            fprintf(stderr, "FAILED line %d: %s: ", __LINE__, #cond);       \
            fprintf(stderr, __VA_ARGS__);                                   \
            fprintf(stderr, " (last error: %s)\n", rwkv_last_error());      \
        }                                                                   \
    } while (0)

#define EXPECT_STATUS(call, want)                                           \
    do {                                                                    \
        rwkv_status got_ = (call);                                          \
        EXPECT(got_ == (want), "%s gave %s, expected %s", #call,            \
               rwkv_status_name(got_), rwkv_status_name(want));             \
    } while (0)

/* Collects generated text. */
typedef struct {
    char text[4096];
    size_t len;
} text_buf;

static int32_t collect(const char *piece, size_t len, void *user_data) {
    text_buf *b = user_data;
    if (b->len + len < sizeof b->text) {
        memcpy(b->text + b->len, piece, len);
        b->len += len;
        b->text[b->len] = '\0';
    }
    return 0;
}

static int32_t stop_at_once(const char *piece, size_t len, void *user_data) {
    (void)piece, (void)len, (void)user_data;
    return 1;
}

/* What calls made from inside a callback return. */
typedef struct {
    rwkv_session *self;
    rwkv_session *other;
    rwkv_model *model;
    rwkv_status feed_self, feed_other, tokenize, free_status;
    int calls;
} reentry;

static int32_t call_back_in(const char *piece, size_t len, void *user_data) {
    (void)piece, (void)len;
    reentry *r = user_data;
    if (r->calls++ == 0) {
        size_t n = 0;
        uint32_t ids[16];
        r->feed_self = rwkv_session_feed_text(r->self, "x", NULL);
        r->feed_other = rwkv_session_feed_text(r->other, "x", NULL);
        r->tokenize = rwkv_tokenize(r->model, "Hello", ids, 16, &n);
        /* Freeing the session being generated is allowed: it lives until the call ends. */
        r->free_status = rwkv_session_free(r->self);
    }
    return 0;
}

static rwkv_generate_options greedy(uint32_t max_tokens) {
    rwkv_generate_options o = rwkv_generate_options_default();
    o.temperature = 0.0f;
    o.max_tokens = max_tokens;
    return o;
}

/* Greedy continuation of `prompt` in a fresh session of `model`. */
static void continuation(rwkv_model *model, const char *prompt, uint32_t n, text_buf *out) {
    rwkv_session *s = NULL;
    out->len = 0;
    out->text[0] = '\0';
    EXPECT_STATUS(rwkv_session_create(model, &s), RWKV_OK);
    EXPECT_STATUS(rwkv_session_feed_text(s, prompt, NULL), RWKV_OK);
    rwkv_generate_options o = greedy(n);
    EXPECT_STATUS(rwkv_session_generate(s, &o, collect, out, NULL), RWKV_OK);
    EXPECT_STATUS(rwkv_session_free(s), RWKV_OK);
}

typedef struct {
    rwkv_model *model;
    const char *prompt;
    text_buf out;
} job;

static void *run_job(void *arg) {
    job *j = arg;
    continuation(j->model, j->prompt, 24, &j->out);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL TOKENIZER TMPDIR\n", argv[0]);
        return 2;
    }
    const char *model_path = argv[1], *tokenizer_path = argv[2], *tmp = argv[3];
    char path[4096];

    /* Names and version. */
    EXPECT(strcmp(rwkv_status_name(RWKV_ERR_BUSY), "RWKV_ERR_BUSY") == 0, "status name");
    EXPECT(strcmp(rwkv_status_name(999), "unknown") == 0, "unknown status name");
    EXPECT(strlen(rwkv_version()) > 0, "version");

    /* NULL handles and outputs. */
    rwkv_session *s = (rwkv_session *)1; /* must be cleared on failure */
    EXPECT_STATUS(rwkv_session_create(NULL, &s), RWKV_ERR_NULL_ARGUMENT);
    EXPECT(s == NULL, "the output handle is NULL after a failure");
    EXPECT(strstr(rwkv_last_error(), "NULL") != NULL, "message names the NULL");
    EXPECT_STATUS(rwkv_session_feed_text(NULL, "hi", NULL), RWKV_ERR_NULL_ARGUMENT);
    EXPECT_STATUS(rwkv_session_generate(NULL, NULL, NULL, NULL, NULL), RWKV_ERR_NULL_ARGUMENT);
    EXPECT_STATUS(rwkv_session_free(NULL), RWKV_ERR_NULL_ARGUMENT);
    EXPECT_STATUS(rwkv_model_free(NULL), RWKV_ERR_NULL_ARGUMENT);
    EXPECT_STATUS(rwkv_context_free(NULL), RWKV_ERR_NULL_ARGUMENT);
    EXPECT_STATUS(rwkv_model_get_info(NULL, NULL), RWKV_ERR_NULL_ARGUMENT);
    EXPECT_STATUS(rwkv_context_create(NULL, NULL), RWKV_ERR_NULL_ARGUMENT);

    /* Handles that were never made. */
    EXPECT_STATUS(rwkv_session_feed_text((rwkv_session *)0x12345, "hi", NULL), RWKV_ERR_INVALID_HANDLE);
    EXPECT_STATUS(rwkv_model_free((rwkv_model *)(uintptr_t)-16), RWKV_ERR_INVALID_HANDLE);

    rwkv_context *ctx = NULL;
    EXPECT_STATUS(rwkv_context_create(NULL, &ctx), RWKV_OK);
    char adapter[256];
    size_t n = 0;
    EXPECT_STATUS(rwkv_context_adapter(ctx, adapter, sizeof adapter, &n), RWKV_OK);
    EXPECT(n > 0 && strlen(adapter) == n, "adapter name of %zu bytes", n);

    /* Bad files: the message names the file. */
    rwkv_model *model = (rwkv_model *)1;
    snprintf(path, sizeof path, "%s/no-such-model.safetensors", tmp);
    EXPECT_STATUS(rwkv_model_load(ctx, path, tokenizer_path, NULL, &model), RWKV_ERR_IO);
    EXPECT(model == NULL, "no model after a failed load");
    EXPECT(strstr(rwkv_last_error(), "no-such-model.safetensors") != NULL, "message names the file");
    EXPECT_STATUS(rwkv_model_load(ctx, tokenizer_path, tokenizer_path, NULL, &model), RWKV_ERR_BAD_FILE);
    EXPECT_STATUS(rwkv_model_load(ctx, model_path, model_path, NULL, &model), RWKV_ERR_TOKENIZER);
    rwkv_load_options lo = rwkv_load_options_default();
    lo.quant = "int3";
    EXPECT_STATUS(rwkv_model_load(ctx, model_path, tokenizer_path, &lo, &model), RWKV_ERR_INVALID_ARGUMENT);
    /* A path is bytes (Unix file names need not be UTF-8): not found, not refused. */
    EXPECT_STATUS(rwkv_model_load(ctx, "/nonexistent/\xff\xfe.safetensors", tokenizer_path, NULL, &model), RWKV_ERR_IO);
    /* A context handle is not a model handle. */
    EXPECT_STATUS(rwkv_session_create((rwkv_model *)ctx, &s), RWKV_ERR_INVALID_HANDLE);
    EXPECT(strstr(rwkv_last_error(), "context") != NULL, "message names the kind");

    EXPECT_STATUS(rwkv_model_load(ctx, model_path, tokenizer_path, NULL, &model), RWKV_OK);
    rwkv_model_info info;
    EXPECT_STATUS(rwkv_model_get_info(model, &info), RWKV_OK);
    EXPECT(strcmp(info.arch, "RWKV-7") == 0 && !info.is_transformer, "arch %s", info.arch);
    EXPECT(info.vocab > 0 && info.n_layer > 0 && info.state_bytes > 0 && info.eos_token == 0, "info");

    /* Tokenize: size query, round trip, invalid UTF-8. */
    const char *text = "It is a truth universally acknowledged";
    EXPECT_STATUS(rwkv_tokenize(model, text, NULL, 0, &n), RWKV_ERR_BUFFER_TOO_SMALL);
    EXPECT(n > 0 && n < 64, "token count %zu", n);
    uint32_t ids[64];
    size_t n_ids = 0;
    EXPECT_STATUS(rwkv_tokenize(model, text, ids, 64, &n_ids), RWKV_OK);
    EXPECT(n_ids == n, "same count");
    char back[256];
    EXPECT_STATUS(rwkv_detokenize(model, ids, n_ids, back, strlen(text), &n), RWKV_ERR_BUFFER_TOO_SMALL);
    EXPECT(n == strlen(text), "detokenized size %zu", n);
    EXPECT_STATUS(rwkv_detokenize(model, ids, n_ids, back, sizeof back, &n), RWKV_OK);
    EXPECT(strcmp(back, text) == 0, "round trip gave '%s'", back);
    EXPECT_STATUS(rwkv_tokenize(model, "ok \xc3\x28 bad", ids, 64, &n), RWKV_ERR_INVALID_UTF8);
    EXPECT_STATUS(rwkv_tokenize(model, text, NULL, 64, &n), RWKV_ERR_NULL_ARGUMENT);

    /* A session: invalid input leaves it usable. */
    EXPECT_STATUS(rwkv_session_create(model, &s), RWKV_OK);
    size_t logit_count = 0;
    EXPECT_STATUS(rwkv_session_logits(s, NULL, 0, &logit_count), RWKV_ERR_INVALID_ARGUMENT); /* nothing fed */
    EXPECT_STATUS(rwkv_session_generate(s, NULL, NULL, NULL, NULL), RWKV_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(rwkv_session_feed_text(s, "\xff\xfe\xfd", NULL), RWKV_ERR_INVALID_UTF8);
    EXPECT(strstr(rwkv_last_error(), "UTF-8") != NULL, "message says UTF-8");
    uint32_t bad_token = info.vocab;
    EXPECT_STATUS(rwkv_session_feed_tokens(s, &bad_token, 1), RWKV_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(rwkv_session_feed_tokens(s, NULL, 3), RWKV_ERR_NULL_ARGUMENT);
    size_t fed = 0;
    EXPECT_STATUS(rwkv_session_feed_text(s, text, &fed), RWKV_OK);
    EXPECT(fed == n_ids, "fed %zu tokens", fed);
    EXPECT_STATUS(rwkv_session_logits(s, NULL, 0, &logit_count), RWKV_ERR_BUFFER_TOO_SMALL);
    EXPECT(logit_count == info.vocab, "logit count %zu", logit_count);
    float *logits = malloc(logit_count * sizeof(float));
    EXPECT_STATUS(rwkv_session_logits(s, logits, logit_count, &logit_count), RWKV_OK);
    free(logits);

    rwkv_generate_options o = greedy(8);
    o.temperature = -1.0f;
    EXPECT_STATUS(rwkv_session_generate(s, &o, NULL, NULL, NULL), RWKV_ERR_INVALID_ARGUMENT);
    o = greedy(8);
    const char *bad_stop[] = {"\xff"};
    o.stop = bad_stop;
    o.n_stop = 1;
    EXPECT_STATUS(rwkv_session_generate(s, &o, NULL, NULL, NULL), RWKV_ERR_INVALID_UTF8);
    o.stop = NULL;
    EXPECT_STATUS(rwkv_session_generate(s, &o, NULL, NULL, NULL), RWKV_ERR_NULL_ARGUMENT);

    /* A clone continues exactly as the original. */
    rwkv_session *fork = NULL;
    EXPECT_STATUS(rwkv_session_clone(s, &fork), RWKV_OK);
    text_buf a = {0}, b = {0};
    o = greedy(16);
    rwkv_generation ga, gb;
    EXPECT_STATUS(rwkv_session_generate(s, &o, collect, &a, &ga), RWKV_OK);
    EXPECT_STATUS(rwkv_session_generate(fork, &o, collect, &b, &gb), RWKV_OK);
    EXPECT(a.len > 0 && strcmp(a.text, b.text) == 0, "clone: '%s' vs '%s'", a.text, b.text);
    EXPECT(ga.n_tokens == 16 && ga.stop_reason == RWKV_STOP_MAX_TOKENS, "%u tokens", ga.n_tokens);

    /* A callback that returns nonzero stops after one piece. */
    EXPECT_STATUS(rwkv_session_generate(fork, &o, stop_at_once, NULL, &gb), RWKV_OK);
    EXPECT(gb.stop_reason == RWKV_STOP_CANCELLED && gb.n_tokens >= 1 && gb.n_tokens < 16, "cancel after %u", gb.n_tokens);

    /* State save/load: the state after the prompt, reloaded, continues the same. */
    rwkv_session *t = NULL;
    EXPECT_STATUS(rwkv_session_create(model, &t), RWKV_OK);
    EXPECT_STATUS(rwkv_session_feed_tokens(t, ids, n_ids - 1), RWKV_OK);
    snprintf(path, sizeof path, "%s/prompt.state.safetensors", tmp);
    EXPECT_STATUS(rwkv_session_save_state(t, path), RWKV_OK);
    EXPECT_STATUS(rwkv_session_save_state(t, model_path), RWKV_ERR_IO); /* never over the model */
    EXPECT_STATUS(rwkv_session_reset(t), RWKV_OK);
    EXPECT_STATUS(rwkv_session_load_state(t, path), RWKV_OK);
    EXPECT_STATUS(rwkv_session_feed_tokens(t, ids + n_ids - 1, 1), RWKV_OK);
    text_buf c = {0};
    EXPECT_STATUS(rwkv_session_generate(t, &o, collect, &c, NULL), RWKV_OK);
    EXPECT(strcmp(a.text, c.text) == 0, "after load: '%s' vs '%s'", c.text, a.text);
    EXPECT_STATUS(rwkv_session_load_state(t, tokenizer_path), RWKV_ERR_BAD_FILE);
    snprintf(path, sizeof path, "%s/missing.state", tmp);
    EXPECT_STATUS(rwkv_session_load_state(t, path), RWKV_ERR_IO);

    /* From a callback: the same session is busy (not a deadlock); others work. */
    reentry r = {.self = t, .other = fork, .model = model};
    EXPECT_STATUS(rwkv_session_generate(t, &o, call_back_in, &r, NULL), RWKV_OK);
    EXPECT(r.feed_self == RWKV_ERR_BUSY, "same session from its callback: %s", rwkv_status_name(r.feed_self));
    EXPECT(r.feed_other == RWKV_OK, "another session from a callback: %s", rwkv_status_name(r.feed_other));
    EXPECT(r.tokenize == RWKV_OK, "tokenize from a callback: %s", rwkv_status_name(r.tokenize));
    EXPECT(r.free_status == RWKV_OK, "free from a callback: %s", rwkv_status_name(r.free_status));

    /* Freed handles stay invalid: t was freed inside its callback. */
    EXPECT_STATUS(rwkv_session_feed_text(t, "hi", NULL), RWKV_ERR_INVALID_HANDLE);
    EXPECT_STATUS(rwkv_session_free(t), RWKV_ERR_INVALID_HANDLE);
    EXPECT_STATUS(rwkv_session_free(fork), RWKV_OK);
    EXPECT_STATUS(rwkv_session_generate(fork, &o, NULL, NULL, NULL), RWKV_ERR_INVALID_HANDLE);
    EXPECT(strstr(rwkv_last_error(), "not a live session") != NULL, "message says freed");

    /* Two threads generate at once on two sessions of one model; each equals
     * its solo run. */
    job j1 = {.model = model, .prompt = "Mr. Darcy"}, j2 = {.model = model, .prompt = "Elizabeth"};
    pthread_t t1, t2;
    pthread_create(&t1, NULL, run_job, &j1);
    pthread_create(&t2, NULL, run_job, &j2);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    text_buf solo1, solo2;
    continuation(model, "Mr. Darcy", 24, &solo1);
    continuation(model, "Elizabeth", 24, &solo2);
    EXPECT(strcmp(j1.out.text, solo1.text) == 0 && j1.out.len > 0, "thread 1: '%s' vs '%s'", j1.out.text, solo1.text);
    EXPECT(strcmp(j2.out.text, solo2.text) == 0 && j2.out.len > 0, "thread 2: '%s' vs '%s'", j2.out.text, solo2.text);

    /* A session outlives its freed model and context. */
    EXPECT_STATUS(rwkv_model_free(model), RWKV_OK);
    EXPECT_STATUS(rwkv_context_free(ctx), RWKV_OK);
    EXPECT_STATUS(rwkv_model_free(model), RWKV_ERR_INVALID_HANDLE);
    EXPECT_STATUS(rwkv_session_feed_text(s, " And so", NULL), RWKV_OK);
    EXPECT_STATUS(rwkv_session_generate(s, &o, NULL, NULL, NULL), RWKV_OK);
    EXPECT_STATUS(rwkv_session_free(s), RWKV_OK);

    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
