/* FS_IOC_GETFSMAP: the kernel's map of a mounted filesystem's space.
 * The header plus records form one variable-sized buffer; this shim
 * allocates it and hands records out one by one. */
#ifndef HS_FSMAP_H
#define HS_FSMAP_H
#include <stdint.h>

typedef struct hs_fsmap_rec {
    uint32_t device;
    uint32_t flags;
    uint64_t physical;  /* bytes */
    uint64_t owner;
    uint64_t offset;
    uint64_t length;    /* bytes */
} hs_fsmap_rec;

/* Special owners (FMR_OWN_*), exported because they are macros. */
extern const uint64_t HS_FMR_OWN_FREE;
extern const uint64_t HS_FMR_OWN_UNKNOWN;
extern const uint32_t HS_FMR_OF_LAST;

typedef struct hs_fsmap_iter hs_fsmap_iter;
/* Start a query over the whole filesystem, `batch` records per ioctl. */
hs_fsmap_iter *hs_fsmap_begin(int fd, unsigned batch);
/* 1: *rec filled; 0: end; -1: errno set. */
int hs_fsmap_next(hs_fsmap_iter *it, hs_fsmap_rec *rec);
void hs_fsmap_end(hs_fsmap_iter *it);
#endif
