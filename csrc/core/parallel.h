/* Runs one function over the items (factors or blocks) of a kernel call on a few POSIX
 * threads. Used by the factor-update, root-inverse and preconditioning kernels to work across
 * blocks while SciPy's BLAS runs single-threaded (_backend.single_threaded_blas).
 *
 * Threads are created for the call and joined before it returns (no pool, no global state).
 * The calling thread works too. Items carry an estimated cost in nanoseconds of one core;
 * the call uses at most one thread per SHAMPOO_PARALLEL_MIN_COST of summed cost, so a small
 * call runs on the calling thread alone and creates no thread at all. Items are handed out by
 * an atomic counter in order of decreasing cost (computed once per call, ties by index),
 * which balances mixed block sizes. Each thread gets its own scratch_bytes of malloc'ed
 * scratch, freed before return. Every item runs exactly once, on one thread, with the same
 * code as the serial run, so results are bitwise identical for any num_threads as long as
 * items write disjoint memory. */
#ifndef SHAMPOO_PARALLEL_H
#define SHAMPOO_PARALLEL_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* Estimated work (nanoseconds of one core) that each thread of a call must have, else fewer
 * threads are used: one when the whole call is below it. On the 2-core CI machine (a VM)
 * creating and joining a thread costs ~100 us (20-50 us is usual on bare metal), and with
 * this check disabled benchmarks/bench_kernels.py's small-table sweep gave 2 threads x0.9-1.0
 * at ~250 us of one-thread work, x1.1-1.5 at ~400-1000 us, x1.3-1.7 above. So two threads
 * start at 2 x 200 us. */
#define SHAMPOO_PARALLEL_MIN_COST 200000

/* Most threads one call starts (num_threads above it is refused by the binding and clamped
 * here): far above any core count the kernels could use, low enough that a mistaken value
 * cannot exhaust the process's threads or scratch (each thread mallocs its own). */
#define SHAMPOO_PARALLEL_MAX_THREADS 1024

/* One item: runs on any thread; scratch is that thread's scratch_bytes (NULL when 0). */
typedef shampoo_status (*shampoo_parallel_item_fn)(void *ctx, void *scratch, int64_t item);
/* Estimated cost of one item in nanoseconds of one core (>= 0), read once per item and only
 * when threads may be used. Only the sum and the order matter, so rough models do. */
typedef double (*shampoo_parallel_cost_fn)(const void *ctx, int64_t item);

/* Calls item_fn(ctx, scratch, i) for every i in [0, n). The first non-OK status returned by an
 * item is the call's result (later ones are dropped) and stops the hand-out of further items;
 * items already running finish. Returns SHAMPOO_ERR_NO_MEMORY when not even the calling
 * thread's scratch can be allocated; if scratch or a thread for the others cannot be had, it
 * runs on fewer threads instead. n >= 0; cost_fn may be NULL (no reordering, serial). */
shampoo_status shampoo_parallel_for(int64_t n, int num_threads, size_t scratch_bytes,
                                    shampoo_parallel_cost_fn cost_fn,
                                    shampoo_parallel_item_fn item_fn, void *ctx);

#endif
