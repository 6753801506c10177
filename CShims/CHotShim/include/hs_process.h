/* Process flags that keep a userspace block server out of the reclaim
 * deadlock (PR_SET_IO_FLUSHER, mlockall), and a fork+exec that sets
 * PR_SET_IO_FLUSHER in the child, because prctl is variadic and a
 * child-side step cannot be written with posix_spawn. */
#ifndef HS_PROCESS_H
#define HS_PROCESS_H
#include <sys/types.h>
int hs_set_io_flusher(void);
int hs_lock_memory(void);
/* Keep large allocations (request buffers) in the heap instead of fresh
 * mmaps: under mlockall every fresh mapping is populated and zeroed. */
void hs_malloc_keep_large(void);
int hs_set_pdeathsig(int sig);
/* fork + (optionally PR_SET_IO_FLUSHER) + (optionally setsid) + stdio:
 * log_fd >= 0: stdin from /dev/null, stdout/stderr to log_fd;
 * log_fd == -1: all three to /dev/null; log_fd == -2: inherited;
 * + close every other fd + execvp(argv[0], argv).
 * Returns the child pid or -1/errno. */
pid_t hs_spawn(char *const argv[], int io_flusher, int log_fd, int new_session);

/* fork + execvpe with the child's stdin, stdout and stderr set to the given
 * descriptors (-1: /dev/null), `envp` as its environment (NULL: ours), in a
 * new session when asked. Every other descriptor is closed in the child. */
pid_t hs_spawn_fds(char *const argv[], char *const envp[], int in_fd, int out_fd, int err_fd, int new_session);
#endif
