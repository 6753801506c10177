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
/* splice(2), which Glibc declares only under _GNU_SOURCE. From a file at
 * `offset` into a pipe (SPLICE_F_NONBLOCK: a full pipe is EAGAIN, never a
 * wait), and from a pipe into a socket; the return value and errno are
 * splice's. */
long hs_splice_from_file(int fd, uint64_t offset, int pipe_w, unsigned long len);
long hs_splice_to(int pipe_r, int fd, unsigned long len);
/* F_SETPIPE_SZ: the pipe's capacity in bytes afterwards, or -1. */
int hs_pipe_set_size(int fd, int bytes);
#endif
