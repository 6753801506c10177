/* Kernel NBD client configuration over generic netlink (the "nbd" family
 * of linux/nbd-netlink.h): connect sockets that are already in the
 * transmission phase to /dev/nbdN, replace dead sockets after a server
 * restart (reconfigure), disconnect, and ask whether a device is connected.
 * The message framing lives here because Swift cannot express nlattr
 * packing without reimplementing libnl. Every call returns 0 or -errno. */
#ifndef HS_NBD_H
#define HS_NBD_H
#include <stdint.h>

typedef struct {
    uint64_t size_bytes;
    uint64_t block_size;        /* 512..4096, a power of two */
    uint64_t server_flags;      /* NBD_FLAG_* transmission flags */
    uint64_t client_flags;      /* NBD_CFLAG_* (0: keep the device on close) */
    uint64_t timeout_s;         /* per-request timeout; 0 = wait forever */
    uint64_t dead_conn_timeout_s; /* how long I/O waits for a reconnect */
    const char *backend;        /* backend identifier shown in /sys/block/nbdN/backend */
} hs_nbd_config;

#define HS_NBD_FLAG_HAS_FLAGS      (1u << 0)
#define HS_NBD_FLAG_READ_ONLY      (1u << 1)
#define HS_NBD_FLAG_SEND_FLUSH     (1u << 2)
#define HS_NBD_FLAG_SEND_FUA       (1u << 3)
#define HS_NBD_FLAG_SEND_TRIM      (1u << 5)
#define HS_NBD_FLAG_CAN_MULTI_CONN (1u << 8)

/* index < 0: the kernel picks a free device. *out_index receives it. */
int hs_nbd_connect(int index, const int *fds, int nfds, const hs_nbd_config *cfg, int *out_index);
/* Hands new sockets to a device whose connections are dead; backend must
 * match the one given at connect (NULL skips the check). */
int hs_nbd_reconfigure(int index, const int *fds, int nfds, uint64_t dead_conn_timeout_s, const char *backend);
int hs_nbd_disconnect(int index);
/* *connected = 1 if the device has a live configuration. */
int hs_nbd_status(int index, int *connected);

#endif
