/* Flags that Glibc only defines under _GNU_SOURCE, which Swift's Glibc
 * module does not set: O_DIRECT and the fallocate modes. */
#ifndef HS_FILE_H
#define HS_FILE_H
#include <stdint.h>
extern const int HS_O_DIRECT;
extern const int HS_FALLOC_PUNCH_HOLE;   /* | KEEP_SIZE included */
extern const int HS_FALLOC_ZERO_RANGE;   /* | KEEP_SIZE included */
int hs_fallocate(int fd, int mode, uint64_t offset, uint64_t len);
/* Bytes waiting to be read on a socket (FIONREAD), or -1. */
int hs_pending_bytes(int fd);
#endif
