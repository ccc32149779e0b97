/* Packed symmetric storage of factor matrices and inverse roots (issue 11): each d x d matrix
 * of a block is kept as its upper triangle by rows (d(d+1)/2 elements: row 0's d entries, then
 * row 1's d-1 from the diagonal on, ...), a block's matrices back to back, blocks in table
 * order ("packed layout"; offsets follow from the table alone, so a table of consecutive
 * blocks addresses a slice of it). Kernels that need full matrices read them unpacked into a
 * bounded scratch of factor layout (the table's BF_FACTOR_OFFSET) and pack results back. */
#ifndef SHAMPOO_SYM_PACK_H
#define SHAMPOO_SYM_PACK_H

#include <stdint.h>
#include "status.h"

/* Elements of the packed layout of a table's blocks, or -1 for a malformed table or a count
 * beyond int64. */
int64_t shampoo_packed_numel(const int64_t *table, int64_t nblocks);

/* full (factor layout) <- packed, both triangles, for every factor of every active block
 * (active: one per block, NULL = all); other factors of full are not written. */
shampoo_status shampoo_sym_unpack_f32(float *full, const float *packed, const int64_t *table,
                                      int64_t nblocks, const uint8_t *active);
shampoo_status shampoo_sym_unpack_f64(double *full, const double *packed, const int64_t *table,
                                      int64_t nblocks, const uint8_t *active);

/* packed <- upper triangle of full (factor layout) for every factor f with mask[f] (one per
 * factor, indexed by BF_FACTOR_INDEX; NULL = all); other factors of packed are not written.
 * average != 0 stores the symmetric part 0.5 F_ij + 0.5 F_ji instead (inverse roots, whose
 * rounding is not symmetric; equal to F_ij bit for bit when F is symmetric, short of
 * subnormals); 0 copies the upper triangle (factors: symmetric by construction). */
shampoo_status shampoo_sym_pack_f32(float *packed, const float *full, const int64_t *table,
                                    int64_t nblocks, const uint8_t *mask, int average);
shampoo_status shampoo_sym_pack_f64(double *packed, const double *full, const int64_t *table,
                                    int64_t nblocks, const uint8_t *mask, int average);

/* The commit step after root_inverse, per factor, both packed: commit[f] ? dst[f] <- src[f] :
 * src[f] <- dst[f] (so src ends holding the working inverse roots for this step either way). */
shampoo_status shampoo_packed_commit_f32(float *dst, float *src, const int64_t *table,
                                         int64_t nblocks, const uint8_t *commit);
shampoo_status shampoo_packed_commit_f64(double *dst, double *src, const int64_t *table,
                                         int64_t nblocks, const uint8_t *commit);

/* Per factor between the packed layout and a compact one that holds only the factors f with
 * select[f] (one per factor, indexed by BF_FACTOR_INDEX), back to back in table order: those
 * with write[f] (NULL = all selected) are copied, compact -> packed when to_packed, else
 * packed -> compact (a staged root step's factors and roots, without unpacking). The two
 * buffers must not overlap. */
shampoo_status shampoo_packed_select_f32(float *compact, float *packed, const int64_t *table,
                                         int64_t nblocks, const uint8_t *select,
                                         const uint8_t *write, int to_packed);
shampoo_status shampoo_packed_select_f64(double *compact, double *packed, const int64_t *table,
                                         int64_t nblocks, const uint8_t *select,
                                         const uint8_t *write, int to_packed);

/* Elements of the compact layout of packed_select: the packed sizes of the selected factors
 * (-1 for a malformed table). */
int64_t shampoo_packed_select_numel(const int64_t *table, int64_t nblocks, const uint8_t *select);

#endif
