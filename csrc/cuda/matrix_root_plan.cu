/* Host planning of a root step (matrix_root_cuda.cuh): the factor list, the device workspace
 * sized from the table alone (every factor of size >= 2 counted as dense, so the caller can
 * allocate before the call) with the batch of each factor size found once from cuSOLVER's
 * buffer sizes (solver_batch), and the stable size order of the dense jobs. */
#include "matrix_root_cuda.cuh"

#include <stdlib.h>
#include <string.h>

namespace shampoo_root {

using namespace shampoo_eig;

void release(root_workspace *ws)
{
    free(ws->size_n);
    free(ws->size_batch);
    ws->size_n = ws->size_batch = NULL;
}

int64_t planned_batch(const root_workspace *ws, int64_t n)
{
    for (int64_t i = 0; i < ws->nsizes; i++)
        if (ws->size_n[i] == n)
            return ws->size_batch[i];
    return 1;
}

factor_ref *list_factors(const int64_t *table_host, int64_t nblocks, int64_t *count)
{
    int64_t total = 0;
    for (int64_t b = 0; b < nblocks; b++)
        total += table_host[b * SHAMPOO_BF_COUNT + SHAMPOO_BF_ORDER];
    factor_ref *refs = (factor_ref *)malloc((size_t)(total > 0 ? total : 1) * sizeof(factor_ref));
    if (refs == NULL)
        return NULL;
    int64_t next = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t *row = table_host + b * (int64_t)SHAMPOO_BF_COUNT;
        int64_t offset = row[SHAMPOO_BF_FACTOR_OFFSET];
        for (int64_t k = 0; k < row[SHAMPOO_BF_ORDER]; k++) {
            const int64_t n = row[SHAMPOO_BF_DIMS + k];
            refs[next++] = factor_ref{b, n, offset, row[SHAMPOO_BF_FACTOR_INDEX] + k};
            offset += n * n;
        }
    }
    *count = total;
    return refs;
}

static int compare_int64(const void *a, const void *b)
{
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

template <typename real>
shampoo_status plan_workspace(const shampoo_cuda_env *env, const int64_t *table_host,
                              int64_t nblocks, root_workspace *ws)
{
    int64_t nfactors = 0, factor_slots = 0;
    memset(ws, 0, sizeof(*ws));
    factor_ref *refs = list_factors(table_host, nblocks, &nfactors);
    const size_t cap = (size_t)(nfactors > 0 ? nfactors : 1);
    int64_t *sizes = (int64_t *)malloc(cap * sizeof(int64_t));
    ws->size_n = (int64_t *)malloc(cap * sizeof(int64_t));
    ws->size_batch = (int64_t *)malloc(cap * sizeof(int64_t));
    shampoo_status st = SHAMPOO_OK;
    void *syevj_params = NULL;
    if (refs == NULL || sizes == NULL || ws->size_n == NULL || ws->size_batch == NULL) {
        st = SHAMPOO_ERR_NO_MEMORY;
        goto done;
    }
    for (int64_t f = 0; f < nfactors; f++) {
        factor_slots = refs[f].index + 1 > factor_slots ? refs[f].index + 1 : factor_slots;
        sizes[f] = refs[f].n;
        if (refs[f].n > DIM_LIMIT) {
            st = SHAMPOO_ERR_UNSUPPORTED;
            goto done;
        }
    }
    qsort(sizes, (size_t)nfactors, sizeof(int64_t), compare_int64);
    if ((st = SHAMPOO_SOLVER_CHECK("cusolverDnCreateSyevjInfo",
                                   env->libs->syevj_info_create(&syevj_params))) != SHAMPOO_OK)
        goto done;
    {
        int64_t stage = 0, wlen = 0;
        size_t solver = 0;
        for (int64_t f = 0; f < nfactors;) {
            int64_t n = sizes[f], count = 0;
            while (f < nfactors && sizes[f] == n) {
                f++;
                count++;
            }
            ws->max_n = n > ws->max_n ? n : ws->max_n;
            if (n < 2)
                continue;
            int64_t batch = 1;
            size_t bytes = 0;
            if ((st = solver_batch<real>(env, solver_for(env->libs, n, false), n, count,
                                         syevj_params, &batch, &bytes)) != SHAMPOO_OK)
                goto done;
            ws->size_n[ws->nsizes] = n;
            ws->size_batch[ws->nsizes++] = batch;
            stage = batch * n * n > stage ? batch * n * n : stage;
            wlen = batch * n > wlen ? batch * n : wlen;
            solver = bytes > solver ? bytes : solver;
        }
        ws->factor_count = factor_slots;
        ws->flags = shampoo_align256((size_t)factor_slots * sizeof(int32_t));
        /* job arrays: offset, n, factor (int64) and alpha (double) per factor */
        ws->jobs = shampoo_align256(4 * (size_t)(nfactors > 0 ? nfactors : 1) * 8);
        ws->info = shampoo_align256((size_t)(nfactors + 1) * sizeof(int));
        ws->stage = shampoo_align256((size_t)stage * sizeof(real));
        ws->w = shampoo_align256((size_t)wlen * sizeof(real));
        ws->solver = shampoo_align256(solver);
        if (sizeof(real) == 4 && ws->max_n >= 2) {
            /* float64 retry of one factor at a time (syevd) */
            const int64_t n = ws->max_n;
            int64_t one = 1;
            size_t bytes = 0;
            if ((st = solver_batch<double>(env, SOLVER_SYEVD, n, 1, syevj_params, &one,
                                           &bytes)) != SHAMPOO_OK)
                goto done;
            ws->retry_stage = shampoo_align256((size_t)(n * n) * sizeof(double));
            ws->retry_w = shampoo_align256((size_t)n * sizeof(double));
            ws->retry_solver = shampoo_align256(bytes);
        }
        ws->total = ws->flags + ws->jobs + ws->info + 3 * ws->stage + ws->w + ws->solver +
                    3 * ws->retry_stage + ws->retry_w + ws->retry_solver;
    }
done:
    if (syevj_params != NULL)
        env->libs->syevj_info_destroy(syevj_params);
    free(sizes);
    free(refs);
    if (st != SHAMPOO_OK)
        release(ws);
    return st;
}

static int compare_int64_pair(const void *a, const void *b)
{
    const int64_t *x = (const int64_t *)a, *y = (const int64_t *)b;
    if (x[0] != y[0])
        return (x[0] > y[0]) - (x[0] < y[0]);
    return (x[1] > y[1]) - (x[1] < y[1]);
}

bool sort_dense_jobs(int64_t *offset, int64_t *n, int64_t *factor, double *alpha,
                     int64_t first, int64_t end)
{
    const int64_t count = end - first;
    if (count < 2)
        return true;
    /* (n, original position) pairs: sorting them is stable by construction */
    int64_t *keys = (int64_t *)malloc((size_t)count * 2 * sizeof(int64_t));
    int64_t *tmp = (int64_t *)malloc((size_t)count * 3 * sizeof(int64_t));
    double *tmp_alpha = (double *)malloc((size_t)count * sizeof(double));
    if (keys == NULL || tmp == NULL || tmp_alpha == NULL) {
        free(keys);
        free(tmp);
        free(tmp_alpha);
        return false;
    }
    for (int64_t i = 0; i < count; i++) {
        keys[2 * i] = n[first + i];
        keys[2 * i + 1] = i;
    }
    qsort(keys, (size_t)count, 2 * sizeof(int64_t), compare_int64_pair);
    for (int64_t i = 0; i < count; i++) {
        const int64_t from = first + keys[2 * i + 1];
        tmp[i] = offset[from];
        tmp[count + i] = n[from];
        tmp[2 * count + i] = factor[from];
        tmp_alpha[i] = alpha[from];
    }
    for (int64_t i = 0; i < count; i++) {
        offset[first + i] = tmp[i];
        n[first + i] = tmp[count + i];
        factor[first + i] = tmp[2 * count + i];
        alpha[first + i] = tmp_alpha[i];
    }
    free(keys);
    free(tmp);
    free(tmp_alpha);
    return true;
}

template shampoo_status plan_workspace<float>(const shampoo_cuda_env *, const int64_t *,
                                              int64_t, root_workspace *);
template shampoo_status plan_workspace<double>(const shampoo_cuda_env *, const int64_t *,
                                               int64_t, root_workspace *);

} // namespace shampoo_root
