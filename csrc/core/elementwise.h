/* The fused elementwise passes of one step, each one loop over the block table:
 *   gather  : param-layout gradient (and parameter) -> block layout, L2 decay, finiteness
 *   scatter : block layout -> param layout (DDP: the gathered updates of every rank)
 *   moments : grafting accumulator, filtered gradient, bias correction (state in place)
 *   finish  : grafting preconditioner and norm ratio, decoupled decay, momentum, -lr * P,
 *             written back into param layout.
 * They are three passes, not one, because the factor update and root inverse (which may
 * fail, and must fail before any state changes) sit between gather and moments, and the
 * preconditioner needs the filtered gradient that moments produces.
 * Scalars are doubles converted to `real` at use; SPEC B §4.12 float32 scalars (lr, bias
 * corrections) arrive already rounded by the caller. Inactive blocks are never read nor
 * written. Sums for norms accumulate in double. */
#ifndef SHAMPOO_ELEMENTWISE_H
#define SHAMPOO_ELEMENTWISE_H

#include <stdint.h>
#include "status.h"

/* grad_blocks <- block(grad_flat) + l2_weight_decay * block(param_flat)   (SPEC §4.3)
 * param_blocks <- block(param_flat)                    (only when param_blocks != NULL)
 * grad_flat, param_flat: param layout. grad_blocks, param_blocks: block layout.
 * param_flat may be NULL only if param_blocks is NULL and l2_weight_decay == 0.
 * *first_nonfinite_block: index of the first active block whose gradient (after L2) holds a
 * NaN or Inf, or -1.
 * sq_norms (NULL: not wanted): nblocks doubles; sq_norms[b] <- ||G_b||_F^2 (after L2), summed
 * in double from the values stored in grad_blocks, for active blocks (0 for inactive ones).
 * It is the trace that the factor update adds to every factor of the block (before its
 * (1 - beta2) weight), so the caller can prove before any write that no new factor entry
 * overflows: for PSD F, |F_ij| <= trace(F) (the no-overflow check of the engine). */
shampoo_status shampoo_gather_f32(float *grad_blocks, float *param_blocks,
                                  const float *grad_flat, const float *param_flat,
                                  const int64_t *table, int64_t nblocks, const uint8_t *active,
                                  double l2_weight_decay, int64_t *first_nonfinite_block,
                                  double *sq_norms);
shampoo_status shampoo_gather_f64(double *grad_blocks, double *param_blocks,
                                  const double *grad_flat, const double *param_flat,
                                  const int64_t *table, int64_t nblocks, const uint8_t *active,
                                  double l2_weight_decay, int64_t *first_nonfinite_block,
                                  double *sq_norms);

/* block(flat) <- blocks for every active block: the inverse of gather's block copy. Used to
 * write gathered DDP updates (block layout, every rank's blocks) into the parameters' layout.
 * flat: param layout, out; blocks: block layout, in. Inactive blocks are not written. */
shampoo_status shampoo_scatter_f32(float *flat, const float *blocks, const int64_t *table,
                                   int64_t nblocks, const uint8_t *active);
shampoo_status shampoo_scatter_f64(double *flat, const double *blocks, const int64_t *table,
                                   int64_t nblocks, const uint8_t *active);

typedef struct shampoo_moments_params {
    int update_grafting_state;   /* nonzero: V is updated (AdaGrad/RMSprop/Adam grafting) */
    double grafting_beta2;       /* V <- V + G*G if 1, else beta2*V + (1-beta2)*G*G (§4.5) */
    double beta1;                /* 0: no filtered gradient, G_hat = G */
    double beta3;                /* G_hat = lerp(F_old, G, 1 - beta3)  (§4.7) */
    double bias_correction1;     /* G_hat /= bc1 when use_bias_correction, else pass 1.0 */
} shampoo_moments_params;

/* grads: block layout, in: G; out: G_hat. grafting_state (V): block layout, NULL unless
 * update_grafting_state. filtered_grad (F): block layout, NULL iff beta1 == 0.
 * lerp follows torch: w < 0.5 ? a + w*(b-a) : b - (b-a)*(1-w). */
shampoo_status shampoo_moments_f32(float *grads, float *grafting_state, float *filtered_grad,
                                   const int64_t *table, int64_t nblocks, const uint8_t *active,
                                   const shampoo_moments_params *p);
shampoo_status shampoo_moments_f64(double *grads, double *grafting_state, double *filtered_grad,
                                   const int64_t *table, int64_t nblocks, const uint8_t *active,
                                   const shampoo_moments_params *p);

typedef enum shampoo_graft_kind {
    SHAMPOO_GRAFT_NONE = 0,      /* no grafting config */
    SHAMPOO_GRAFT_SGD = 1,       /* graft(G_hat) = G_hat */
    SHAMPOO_GRAFT_DIAGONAL = 2   /* graft(G_hat) = G_hat / (sqrt(V / bcg) + eps_g) */
} shampoo_graft_kind;

typedef struct shampoo_finish_params {
    shampoo_graft_kind graft;
    int grafting_phase;             /* nonzero: P = graft(G_hat), Shampoo not applied */
    double grafting_bias_correction;/* bcg (float32-rounded; 1.0 when off) */
    double grafting_epsilon;        /* eps_g */
    double decoupled_weight_decay;  /* P += wd * W  (§4.9); 0 when off or when L2 is used */
    double momentum;                /* 0: no momentum buffer (§4.10) */
    double dampening;
    int nesterov;
    double lr;                      /* float32-rounded lr (§4.11) */
} shampoo_finish_params;

/* For every active block:
 *   P = grafting_phase ? graft(G_hat) : shampoo_dir, times
 *       ||graft(G_hat)||_F / (||shampoo_dir||_F + 1e-16) when not grafting_phase and graft
 *       is not NONE (norms in `real`, SPEC §4.8);
 *   P += wd * W;  momentum / Nesterov;  update = -lr * P  written at the block's place in
 *   update_flat (param layout).
 * grads: block layout G_hat. shampoo_dir: block layout (NULL allowed when grafting_phase).
 * grafting_state: block layout V (NULL unless graft is DIAGONAL). param_blocks: block layout
 * W (NULL allowed when decoupled_weight_decay == 0). momentum_state: block layout, in/out,
 * NULL iff momentum == 0. update_flat: param layout; only active blocks' elements written.
 * update_flat may be grads itself when the table places every block at its block-layout
 * offset with row-major strides: each element is read before it is overwritten (issue 11). */
shampoo_status shampoo_finish_f32(float *update_flat, const float *grads,
                                  const float *shampoo_dir, const float *grafting_state,
                                  const float *param_blocks, float *momentum_state,
                                  const int64_t *table, int64_t nblocks, const uint8_t *active,
                                  const shampoo_finish_params *p);
shampoo_status shampoo_finish_f64(double *update_flat, const double *grads,
                                  const double *shampoo_dir, const double *grafting_state,
                                  const double *param_blocks, double *momentum_state,
                                  const int64_t *table, int64_t nblocks, const uint8_t *active,
                                  const shampoo_finish_params *p);

#endif
