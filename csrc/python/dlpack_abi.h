/* DLPack data structures (ABI of DLPack 1.x, https://dmlc.github.io/dlpack/latest/c_api.html),
 * written from the specification: struct layout and constants only, no Python, no logic. */
#ifndef SHAMPOO_DLPACK_ABI_H
#define SHAMPOO_DLPACK_ABI_H

#include <stdint.h>

/* Major version this consumer understands for versioned capsules. */
#define SHAMPOO_DLPACK_MAJOR_VERSION 1u

/* DLManagedTensorVersioned.flags bits. */
#define SHAMPOO_DLPACK_FLAG_READ_ONLY ((uint64_t)1 << 0)
#define SHAMPOO_DLPACK_FLAG_IS_COPIED ((uint64_t)1 << 1)

/* DLDeviceType (a C enum, int-sized). */
typedef enum {
    SHAMPOO_DL_CPU = 1,
    SHAMPOO_DL_CUDA = 2,
    SHAMPOO_DL_CUDA_HOST = 3,
    SHAMPOO_DL_CUDA_MANAGED = 13
} shampoo_dl_device_type;

/* DLDataTypeCode. */
enum {
    SHAMPOO_DL_INT = 0,
    SHAMPOO_DL_UINT = 1,
    SHAMPOO_DL_FLOAT = 2,
    SHAMPOO_DL_BFLOAT = 4,
    SHAMPOO_DL_COMPLEX = 5,
    SHAMPOO_DL_BOOL = 6
};

typedef struct {
    shampoo_dl_device_type device_type;
    int32_t device_id;
} shampoo_dl_device;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} shampoo_dl_data_type;

typedef struct {
    void *data;
    shampoo_dl_device device;
    int32_t ndim;
    shampoo_dl_data_type dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} shampoo_dl_tensor;

/* Legacy (unversioned) managed tensor: capsule name "dltensor". */
typedef struct shampoo_dl_managed_tensor {
    shampoo_dl_tensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct shampoo_dl_managed_tensor *self);
} shampoo_dl_managed_tensor;

typedef struct {
    uint32_t major;
    uint32_t minor;
} shampoo_dl_version;

/* Versioned managed tensor (DLPack >= 1.0): capsule name "dltensor_versioned". */
typedef struct shampoo_dl_managed_tensor_versioned {
    shampoo_dl_version version;
    void *manager_ctx;
    void (*deleter)(struct shampoo_dl_managed_tensor_versioned *self);
    uint64_t flags;
    shampoo_dl_tensor dl_tensor;
} shampoo_dl_managed_tensor_versioned;

#endif
