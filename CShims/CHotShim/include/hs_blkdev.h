/* Block device geometry and zeroing: BLKGETSIZE64, BLKSSZGET, BLKDISCARD,
 * BLKZEROOUT, BLKFLSBUF are macros built from _IO*, which Swift cannot import. */
#ifndef HS_BLKDEV_H
#define HS_BLKDEV_H
#include <stdint.h>

/* Size in bytes of the block device (or regular file) open on fd; -1/errno. */
int hs_blk_getsize64(int fd, uint64_t *size);
/* Logical sector size; -1/errno. */
int hs_blk_sszget(int fd, int *ssz);
/* Discard / zero out [offset, offset+len) on a block device; -1/errno. */
int hs_blk_discard(int fd, uint64_t offset, uint64_t len);
int hs_blk_zeroout(int fd, uint64_t offset, uint64_t len);
/* Major/minor of a device number, and whether a mode is a block device. */
unsigned hs_major(uint64_t dev);
unsigned hs_minor(uint64_t dev);
#endif
