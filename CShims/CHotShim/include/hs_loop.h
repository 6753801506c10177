/* Loop devices through /dev/loop-control and LOOP_CONFIGURE (Linux >= 5.8),
 * so a loop can be set up with direct I/O atomically, without losetup. */
#ifndef HS_LOOP_H
#define HS_LOOP_H
#include <stdint.h>
/* LOOP_CTL_GET_FREE on an open /dev/loop-control: the free index or -1/errno. */
int hs_loop_ctl_get_free(int ctlfd);
/* LOOP_CONFIGURE loopfd to back onto backingfd; direct_io and read_only as
 * flags; block_size 0 keeps the default. -1/errno. */
int hs_loop_configure(int loopfd, int backingfd, int direct_io, int read_only,
                      uint32_t block_size, const char *file_name);
int hs_loop_clr_fd(int loopfd);
/* Whether the loop device uses direct I/O (LO_FLAGS_DIRECT_IO); -1/errno. */
int hs_loop_is_direct_io(int loopfd);
#endif
