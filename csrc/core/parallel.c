/* shampoo_parallel_for (parallel.h): per-call POSIX threads that share the items of one kernel
 * call through an atomic counter, largest items first. */
#define _POSIX_C_SOURCE 200809L

#include "parallel.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

typedef struct parallel_item {
    double cost;
    int64_t index;
} parallel_item;

/* What the threads of one call share. */
typedef struct parallel_shared {
    shampoo_parallel_item_fn item_fn;
    void *ctx;
    const parallel_item *order; /* n items by decreasing cost; NULL: index order */
    int64_t n;
    atomic_llong next;          /* next position in order to hand out */
    atomic_int status;          /* first error of any item, else SHAMPOO_OK */
} parallel_shared;

typedef struct parallel_worker {
    parallel_shared *shared;
    void *scratch;
    pthread_t thread;
} parallel_worker;

static int by_decreasing_cost(const void *a, const void *b)
{
    const parallel_item *x = a, *y = b;
    if (x->cost != y->cost)
        return x->cost > y->cost ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Takes items until none are left or an item has failed. */
static void drain(parallel_shared *s, void *scratch)
{
    while (atomic_load(&s->status) == SHAMPOO_OK) {
        const int64_t pos = (int64_t)atomic_fetch_add(&s->next, 1);
        if (pos >= s->n)
            return;
        const int64_t item = s->order != NULL ? s->order[pos].index : pos;
        const shampoo_status st = s->item_fn(s->ctx, scratch, item);
        if (st != SHAMPOO_OK) {
            int expected = SHAMPOO_OK;
            atomic_compare_exchange_strong(&s->status, &expected, (int)st);
        }
    }
}

static void *worker_main(void *arg)
{
    parallel_worker *w = arg;
    drain(w->shared, w->scratch);
    return NULL;
}

/* The items sorted by decreasing cost, and in *threads the number of threads their summed
 * cost pays for (at most max_threads); NULL when that is one thread or the order cannot be
 * allocated (then the caller runs serially). */
static parallel_item *cost_order(int64_t n, int64_t max_threads, shampoo_parallel_cost_fn cost_fn,
                                 const void *ctx, int64_t *threads)
{
    *threads = 1;
    parallel_item *order = malloc((size_t)n * sizeof(parallel_item));
    if (order == NULL)
        return NULL;
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) {
        order[i].cost = cost_fn(ctx, i);
        order[i].index = i;
        total += order[i].cost;
    }
    const double affordable = total / SHAMPOO_PARALLEL_MIN_COST; /* NaN compares false */
    *threads = affordable >= (double)max_threads ? max_threads
               : affordable >= 2.0              ? (int64_t)affordable
                                                : 1;
    if (*threads <= 1) {
        free(order);
        return NULL;
    }
    qsort(order, (size_t)n, sizeof(parallel_item), by_decreasing_cost);
    return order;
}

shampoo_status shampoo_parallel_for(int64_t n, int num_threads, size_t scratch_bytes,
                                    shampoo_parallel_cost_fn cost_fn,
                                    shampoo_parallel_item_fn item_fn, void *ctx)
{
    if (n < 0 || item_fn == NULL)
        return SHAMPOO_ERR_INVALID_ARG;
    if (n == 0)
        return SHAMPOO_OK;
    parallel_shared shared = {.item_fn = item_fn, .ctx = ctx, .order = NULL, .n = n};
    atomic_init(&shared.next, 0);
    atomic_init(&shared.status, SHAMPOO_OK);
    parallel_item *order = NULL;
    parallel_worker *workers = NULL;
    int nworkers = 0; /* threads besides the caller, each with its scratch */
    void *own_scratch = NULL;
    if (scratch_bytes > 0) {
        own_scratch = malloc(scratch_bytes);
        if (own_scratch == NULL)
            return SHAMPOO_ERR_NO_MEMORY;
    }
    int64_t threads = num_threads < n ? num_threads : n;
    if (threads > SHAMPOO_PARALLEL_MAX_THREADS)
        threads = SHAMPOO_PARALLEL_MAX_THREADS;
    if (threads > 1 && cost_fn != NULL)
        order = cost_order(n, threads, cost_fn, ctx, &threads);
    if (order != NULL) {
        shared.order = order;
        workers = calloc((size_t)(threads - 1), sizeof(parallel_worker));
    }
    /* Missing scratch or a failed pthread_create only means fewer threads. */
    for (int64_t t = 0; workers != NULL && t < threads - 1; t++) {
        parallel_worker *w = &workers[nworkers];
        w->shared = &shared;
        w->scratch = scratch_bytes > 0 ? malloc(scratch_bytes) : NULL;
        if (scratch_bytes > 0 && w->scratch == NULL)
            break;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            free(w->scratch);
            break;
        }
        nworkers++;
    }
    drain(&shared, own_scratch);
    for (int t = 0; t < nworkers; t++) {
        pthread_join(workers[t].thread, NULL);
        free(workers[t].scratch);
    }
    free(workers);
    free(order);
    free(own_scratch);
    return (shampoo_status)atomic_load(&shared.status);
}
