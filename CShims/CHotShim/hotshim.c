#define _GNU_SOURCE
#include "include/hotshim.h"
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/sysmacros.h>
#include <linux/fs.h>
#include <linux/fsmap.h>
#include <linux/loop.h>
#include <linux/falloc.h>
#include <signal.h>
#include <malloc.h>
#include <sys/syscall.h>

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

_Static_assert(sizeof(struct fsmap) == 64, "struct fsmap layout");
_Static_assert(sizeof(struct fsmap_head) == 64 + 2 * sizeof(struct fsmap), "fsmap_head layout");

int hs_blk_getsize64(int fd, uint64_t *size) { return ioctl(fd, BLKGETSIZE64, size); }
int hs_blk_sszget(int fd, int *ssz) { return ioctl(fd, BLKSSZGET, ssz); }
int hs_blk_discard(int fd, uint64_t offset, uint64_t len) {
    uint64_t r[2] = {offset, len};
    return ioctl(fd, BLKDISCARD, r);
}
int hs_blk_zeroout(int fd, uint64_t offset, uint64_t len) {
    uint64_t r[2] = {offset, len};
    return ioctl(fd, BLKZEROOUT, r);
}
unsigned hs_major(uint64_t dev) { return major(dev); }
unsigned hs_minor(uint64_t dev) { return minor(dev); }

int hs_fifreeze(int fd) { return ioctl(fd, FIFREEZE, 0); }
int hs_fithaw(int fd) { return ioctl(fd, FITHAW, 0); }

const uint64_t HS_FMR_OWN_FREE = FMR_OWN_FREE;
const uint64_t HS_FMR_OWN_UNKNOWN = FMR_OWN_UNKNOWN;
const uint32_t HS_FMR_OF_LAST = FMR_OF_LAST;

struct hs_fsmap_iter {
    int fd;
    unsigned pos;
    int done;
    struct fsmap_head *head;
};

hs_fsmap_iter *hs_fsmap_begin(int fd, unsigned batch) {
    if (batch == 0) batch = 1024;
    hs_fsmap_iter *it = calloc(1, sizeof *it);
    if (!it) return NULL;
    it->head = calloc(1, fsmap_sizeof(batch));
    if (!it->head) { free(it); errno = ENOMEM; return NULL; }
    it->fd = fd;
    it->head->fmh_count = batch;
    /* Low key all zero; high key all ones: the whole filesystem. */
    it->head->fmh_keys[1].fmr_device = UINT32_MAX;
    it->head->fmh_keys[1].fmr_physical = UINT64_MAX;
    it->head->fmh_keys[1].fmr_owner = UINT64_MAX;
    it->head->fmh_keys[1].fmr_offset = UINT64_MAX;
    it->head->fmh_keys[1].fmr_flags = UINT32_MAX;
    it->pos = 0;
    it->head->fmh_entries = 0;
    it->done = 0;
    if (ioctl(fd, FS_IOC_GETFSMAP, it->head) < 0) { int e = errno; hs_fsmap_end(it); errno = e; return NULL; }
    return it;
}

int hs_fsmap_next(hs_fsmap_iter *it, hs_fsmap_rec *rec) {
    while (it->pos >= it->head->fmh_entries) {
        if (it->done || it->head->fmh_entries == 0) return 0;
        struct fsmap *last = &it->head->fmh_recs[it->head->fmh_entries - 1];
        if (last->fmr_flags & FMR_OF_LAST) return 0;
        fsmap_advance(it->head);
        it->pos = 0;
        if (ioctl(it->fd, FS_IOC_GETFSMAP, it->head) < 0) return -1;
        if (it->head->fmh_entries == 0) { it->done = 1; return 0; }
    }
    struct fsmap *r = &it->head->fmh_recs[it->pos++];
    rec->device = r->fmr_device;
    rec->flags = r->fmr_flags;
    rec->physical = r->fmr_physical;
    rec->owner = r->fmr_owner;
    rec->offset = r->fmr_offset;
    rec->length = r->fmr_length;
    return 1;
}

void hs_fsmap_end(hs_fsmap_iter *it) {
    if (!it) return;
    free(it->head);
    free(it);
}

int hs_loop_ctl_get_free(int ctlfd) { return ioctl(ctlfd, LOOP_CTL_GET_FREE); }

int hs_loop_configure(int loopfd, int backingfd, int direct_io, int read_only,
                      uint32_t block_size, const char *file_name) {
    struct loop_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.fd = (uint32_t)backingfd;
    cfg.block_size = block_size;
    cfg.info.lo_flags = (direct_io ? LO_FLAGS_DIRECT_IO : 0) | (read_only ? LO_FLAGS_READ_ONLY : 0)
;
    if (file_name) strncpy((char *)cfg.info.lo_file_name, file_name, LO_NAME_SIZE - 1);
    return ioctl(loopfd, LOOP_CONFIGURE, &cfg);
}

int hs_loop_clr_fd(int loopfd) { return ioctl(loopfd, LOOP_CLR_FD, 0); }

int hs_loop_is_direct_io(int loopfd) {
    struct loop_info64 info;
    if (ioctl(loopfd, LOOP_GET_STATUS64, &info) < 0) return -1;
    return (info.lo_flags & LO_FLAGS_DIRECT_IO) ? 1 : 0;
}

int hs_set_io_flusher(void) { return prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0); }
void hs_malloc_keep_large(void) {
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
}
int hs_lock_memory(void) { return mlockall(MCL_CURRENT | MCL_FUTURE); }
int hs_set_pdeathsig(int sig) { return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0); }

pid_t hs_spawn(char *const argv[], int io_flusher, int log_fd, int new_session) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    /* child: only async-signal-safe calls from here to exec */
    if (io_flusher) (void)prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
    if (new_session) (void)setsid();
    /* the parent may block signals for its signal thread: unblock them */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    if (log_fd != -2) {
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) dup2(devnull, 0);
        if (log_fd >= 0) { dup2(log_fd, 1); dup2(log_fd, 2); }
        else if (devnull >= 0) { dup2(devnull, 1); dup2(devnull, 2); }
    }
    /* the child keeps only stdio: no device, socket or pipe leaks into it */
    (void)syscall(SYS_close_range, 3, ~0U, 0);
    execvp(argv[0], argv);
    _exit(127);
}

pid_t hs_spawn_fds(char *const argv[], char *const envp[], int in_fd, int out_fd, int err_fd, int new_session) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    if (new_session) (void)setsid();
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    int devnull = open("/dev/null", O_RDWR);
    /* dup to high numbers first so that 0..2 can be any of them */
    int fds[3] = { in_fd, out_fd, err_fd };
    for (int i = 0; i < 3; i++) {
        int f = fds[i] >= 0 ? fds[i] : devnull;
        fds[i] = f >= 0 ? fcntl(f, F_DUPFD, 10) : -1;
    }
    for (int i = 0; i < 3; i++) if (fds[i] >= 0) dup2(fds[i], i);
    (void)syscall(SYS_close_range, 3, ~0U, 0);
    if (envp) execvpe(argv[0], argv, envp); else execvp(argv[0], argv);
    _exit(127);
}


const int HS_O_DIRECT = O_DIRECT;
int hs_pending_bytes(int fd) { int n = 0; return ioctl(fd, FIONREAD, &n) < 0 ? -1 : n; }
long hs_splice_from_file(int fd, uint64_t offset, int pipe_w, unsigned long len) {
    loff_t off = (loff_t)offset;
    return (long)splice(fd, &off, pipe_w, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}
long hs_splice_to(int pipe_r, int fd, unsigned long len) {
    return (long)splice(pipe_r, NULL, fd, NULL, len, SPLICE_F_MOVE);
}
int hs_pipe_set_size(int fd, int bytes) { return fcntl(fd, F_SETPIPE_SZ, bytes); }
const int HS_FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
const int HS_FALLOC_ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
int hs_fallocate(int fd, int mode, uint64_t offset, uint64_t len) {
    return fallocate(fd, mode, (off_t)offset, (off_t)len);
}

/* FIEMAP (hs_fiemap.h) */
#include <linux/fiemap.h>

const uint32_t HS_FIEMAP_FLAG_SYNC = FIEMAP_FLAG_SYNC;
const uint32_t HS_FIEMAP_EXTENT_LAST = FIEMAP_EXTENT_LAST;
const uint32_t HS_FIEMAP_EXTENT_UNKNOWN = FIEMAP_EXTENT_UNKNOWN;
const uint32_t HS_FIEMAP_EXTENT_DELALLOC = FIEMAP_EXTENT_DELALLOC;
const uint32_t HS_FIEMAP_EXTENT_ENCODED = FIEMAP_EXTENT_ENCODED;
const uint32_t HS_FIEMAP_EXTENT_DATA_ENCRYPTED = FIEMAP_EXTENT_DATA_ENCRYPTED;
const uint32_t HS_FIEMAP_EXTENT_NOT_ALIGNED = FIEMAP_EXTENT_NOT_ALIGNED;
const uint32_t HS_FIEMAP_EXTENT_DATA_INLINE = FIEMAP_EXTENT_DATA_INLINE;
const uint32_t HS_FIEMAP_EXTENT_DATA_TAIL = FIEMAP_EXTENT_DATA_TAIL;
const uint32_t HS_FIEMAP_EXTENT_UNWRITTEN = FIEMAP_EXTENT_UNWRITTEN;
const uint32_t HS_FIEMAP_EXTENT_MERGED = FIEMAP_EXTENT_MERGED;
const uint32_t HS_FIEMAP_EXTENT_SHARED = FIEMAP_EXTENT_SHARED;

_Static_assert(sizeof(struct fiemap) == 32, "struct fiemap layout");
_Static_assert(sizeof(struct fiemap_extent) == 56, "struct fiemap_extent layout");

int hs_fiemap(int fd, uint64_t start, uint64_t length, uint32_t flags,
              hs_fiemap_extent *out, uint32_t max, uint32_t *mapped) {
    union {
        struct fiemap head;
        char raw[sizeof(struct fiemap) + HS_FIEMAP_BATCH_MAX * sizeof(struct fiemap_extent)];
    } buf;
    if (max > HS_FIEMAP_BATCH_MAX) max = HS_FIEMAP_BATCH_MAX;
    memset(&buf.head, 0, sizeof buf.head);
    buf.head.fm_start = start;
    buf.head.fm_length = length;
    buf.head.fm_flags = flags;
    buf.head.fm_extent_count = max;
    if (ioctl(fd, FS_IOC_FIEMAP, &buf) < 0) return -1;
    uint32_t n = buf.head.fm_mapped_extents;
    if (n > max) n = max;
    for (uint32_t i = 0; i < n; i++) {
        const struct fiemap_extent *e = &buf.head.fm_extents[i];
        out[i].logical = e->fe_logical;
        out[i].physical = e->fe_physical;
        out[i].length = e->fe_length;
        out[i].flags = e->fe_flags;
    }
    *mapped = n;
    return 0;
}
