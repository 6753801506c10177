/* FS_IOC_FIEMAP: where a file's data lives on its block device.
 * struct fiemap ends in a flexible array, which Swift cannot import, so
 * this shim runs one ioctl over a stack buffer and copies the extents out.
 * The loop over batches (until FIEMAP_EXTENT_LAST) is in Swift. */
#ifndef HS_FIEMAP_H
#define HS_FIEMAP_H
#include <stdint.h>

typedef struct hs_fiemap_extent {
    uint64_t logical;   /* bytes from the start of the file */
    uint64_t physical;  /* bytes from the start of the device */
    uint64_t length;    /* bytes */
    uint32_t flags;     /* FIEMAP_EXTENT_* */
} hs_fiemap_extent;

/* Most extents one hs_fiemap call returns. */
#define HS_FIEMAP_BATCH_MAX 256

/* Request flags and extent flags (FIEMAP_*), exported because Swift should
 * not hard-code kernel ABI numbers. */
extern const uint32_t HS_FIEMAP_FLAG_SYNC;
extern const uint32_t HS_FIEMAP_EXTENT_LAST;
extern const uint32_t HS_FIEMAP_EXTENT_UNKNOWN;
extern const uint32_t HS_FIEMAP_EXTENT_DELALLOC;
extern const uint32_t HS_FIEMAP_EXTENT_ENCODED;
extern const uint32_t HS_FIEMAP_EXTENT_DATA_ENCRYPTED;
extern const uint32_t HS_FIEMAP_EXTENT_NOT_ALIGNED;
extern const uint32_t HS_FIEMAP_EXTENT_DATA_INLINE;
extern const uint32_t HS_FIEMAP_EXTENT_DATA_TAIL;
extern const uint32_t HS_FIEMAP_EXTENT_UNWRITTEN;
extern const uint32_t HS_FIEMAP_EXTENT_MERGED;
extern const uint32_t HS_FIEMAP_EXTENT_SHARED;

/* One FS_IOC_FIEMAP over the file bytes [start, start+length), with request
 * `flags`: at most `max` (<= HS_FIEMAP_BATCH_MAX) extents go to `out`, their
 * number to *mapped. 0, or -1 with errno set. */
int hs_fiemap(int fd, uint64_t start, uint64_t length, uint32_t flags,
              hs_fiemap_extent *out, uint32_t max, uint32_t *mapped);
#endif
