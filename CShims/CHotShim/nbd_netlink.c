/* Generic netlink framing for the kernel NBD client (see hs_nbd.h). */
#include "include/hs_nbd.h"
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <linux/netlink.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>

#define HS_NL_BUF 8192

typedef struct {
    union { struct nlmsghdr hdr; char bytes[HS_NL_BUF]; } u;
} nlmsg_buf;

static void msg_init(nlmsg_buf *b, uint16_t family, uint8_t cmd, uint8_t version) {
    memset(b, 0, sizeof(*b));
    b->u.hdr.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
    b->u.hdr.nlmsg_type = family;
    b->u.hdr.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    struct genlmsghdr *g = NLMSG_DATA(&b->u.hdr);
    g->cmd = cmd;
    g->version = version;
}

static struct nlattr *put(nlmsg_buf *b, uint16_t type, const void *data, size_t len) {
    size_t need = NLA_ALIGN(NLA_HDRLEN + len);
    if (b->u.hdr.nlmsg_len + need > HS_NL_BUF) return NULL;
    struct nlattr *a = (struct nlattr *)(b->u.bytes + NLMSG_ALIGN(b->u.hdr.nlmsg_len));
    a->nla_type = type;
    a->nla_len = (uint16_t)(NLA_HDRLEN + len);
    if (len) memcpy((char *)a + NLA_HDRLEN, data, len);
    b->u.hdr.nlmsg_len = NLMSG_ALIGN(b->u.hdr.nlmsg_len) + (uint32_t)need;
    return a;
}
static int put_u32(nlmsg_buf *b, uint16_t t, uint32_t v) { return put(b, t, &v, 4) ? 0 : -EMSGSIZE; }
static int put_u64(nlmsg_buf *b, uint16_t t, uint64_t v) { return put(b, t, &v, 8) ? 0 : -EMSGSIZE; }
static struct nlattr *nest_begin(nlmsg_buf *b, uint16_t t) { return put(b, t | NLA_F_NESTED, NULL, 0); }
static void nest_end(nlmsg_buf *b, struct nlattr *n) {
    n->nla_len = (uint16_t)((b->u.bytes + b->u.hdr.nlmsg_len) - (char *)n);
}

static int nl_open(void) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (fd < 0) return -errno;
    struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) { int e = errno; close(fd); return -e; }
    struct timeval tv = { .tv_sec = 10 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

/* Walks attributes in [p, p+len); calls f for each. */
typedef void (*attr_fn)(const struct nlattr *a, void *ctx);
static void each_attr(const char *p, int len, attr_fn f, void *ctx) {
    while (len >= (int)NLA_HDRLEN) {
        const struct nlattr *a = (const struct nlattr *)p;
        if (a->nla_len < NLA_HDRLEN || a->nla_len > len) return;
        f(a, ctx);
        int step = NLA_ALIGN(a->nla_len);
        p += step; len -= step;
    }
}
static const void *attr_data(const struct nlattr *a) { return (const char *)a + NLA_HDRLEN; }
static int attr_len(const struct nlattr *a) { return a->nla_len - NLA_HDRLEN; }

/* Sends b, reads replies until the ack; calls f on each genl reply's attributes. */
static int transact(int fd, nlmsg_buf *b, attr_fn f, void *ctx) {
    static uint32_t seq = 1;
    b->u.hdr.nlmsg_seq = __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED);
    struct sockaddr_nl to = { .nl_family = AF_NETLINK };
    if (sendto(fd, b->u.bytes, b->u.hdr.nlmsg_len, 0, (struct sockaddr *)&to, sizeof(to)) < 0) return -errno;
    char rbuf[HS_NL_BUF];
    for (;;) {
        ssize_t n = recv(fd, rbuf, sizeof(rbuf), 0);
        if (n < 0) return errno == EAGAIN ? -ETIMEDOUT : -errno;
        for (struct nlmsghdr *h = (struct nlmsghdr *)rbuf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != b->u.hdr.nlmsg_seq) continue;
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                return e->error; /* 0 is the ack */
            }
            if (h->nlmsg_type == NLMSG_DONE) return 0;
            if (f && h->nlmsg_len >= NLMSG_LENGTH(GENL_HDRLEN)) {
                const char *p = (const char *)NLMSG_DATA(h) + GENL_HDRLEN;
                each_attr(p, (int)(h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN)), f, ctx);
            }
        }
    }
}

static void family_attr(const struct nlattr *a, void *ctx) {
    if ((a->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_FAMILY_ID && attr_len(a) >= 2)
        *(int *)ctx = *(const uint16_t *)attr_data(a);
}

/* Opens a netlink socket and resolves the "nbd" family. */
static int nbd_family(int *fdout) {
    int fd = nl_open();
    if (fd < 0) return fd;
    nlmsg_buf b;
    msg_init(&b, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
    put(&b, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, strlen(NBD_GENL_FAMILY_NAME) + 1);
    int id = -1;
    int r = transact(fd, &b, family_attr, &id);
    if (r == 0 && id < 0) r = -ENOENT;
    if (r < 0) { close(fd); return r == -ENOENT ? -ENODEV : r; }
    *fdout = fd;
    return id;
}

static int put_sockets(nlmsg_buf *b, const int *fds, int nfds) {
    struct nlattr *socks = nest_begin(b, NBD_ATTR_SOCKETS);
    if (!socks) return -EMSGSIZE;
    for (int i = 0; i < nfds; i++) {
        struct nlattr *item = nest_begin(b, NBD_SOCK_ITEM);
        if (!item || put_u32(b, NBD_SOCK_FD, (uint32_t)fds[i]) < 0) return -EMSGSIZE;
        nest_end(b, item);
    }
    nest_end(b, socks);
    return 0;
}

static void index_attr(const struct nlattr *a, void *ctx) {
    if ((a->nla_type & NLA_TYPE_MASK) == NBD_ATTR_INDEX && attr_len(a) >= 4)
        *(int *)ctx = (int)*(const uint32_t *)attr_data(a);
}

int hs_nbd_connect(int index, const int *fds, int nfds, const hs_nbd_config *cfg, int *out_index) {
    int fd, fam = nbd_family(&fd);
    if (fam < 0) return fam;
    nlmsg_buf b;
    msg_init(&b, (uint16_t)fam, NBD_CMD_CONNECT, NBD_GENL_VERSION);
    int r = 0;
    if (index >= 0) r |= put_u32(&b, NBD_ATTR_INDEX, (uint32_t)index);
    r |= put_u64(&b, NBD_ATTR_SIZE_BYTES, cfg->size_bytes);
    r |= put_u64(&b, NBD_ATTR_BLOCK_SIZE_BYTES, cfg->block_size);
    r |= put_u64(&b, NBD_ATTR_SERVER_FLAGS, cfg->server_flags);
    if (cfg->client_flags) r |= put_u64(&b, NBD_ATTR_CLIENT_FLAGS, cfg->client_flags);
    if (cfg->timeout_s) r |= put_u64(&b, NBD_ATTR_TIMEOUT, cfg->timeout_s);
    if (cfg->dead_conn_timeout_s) r |= put_u64(&b, NBD_ATTR_DEAD_CONN_TIMEOUT, cfg->dead_conn_timeout_s);
    if (cfg->backend && !put(&b, NBD_ATTR_BACKEND_IDENTIFIER, cfg->backend, strlen(cfg->backend) + 1)) r = -EMSGSIZE;
    if (r == 0) r = put_sockets(&b, fds, nfds);
    if (r < 0) { close(fd); return -EMSGSIZE; }
    int got = index;
    r = transact(fd, &b, index_attr, &got);
    close(fd);
    if (r == 0 && out_index) *out_index = got;
    return r;
}

int hs_nbd_reconfigure(int index, const int *fds, int nfds, uint64_t dead_conn_timeout_s, const char *backend) {
    int fd, fam = nbd_family(&fd);
    if (fam < 0) return fam;
    nlmsg_buf b;
    msg_init(&b, (uint16_t)fam, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION);
    int r = put_u32(&b, NBD_ATTR_INDEX, (uint32_t)index);
    if (dead_conn_timeout_s) r |= put_u64(&b, NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_s);
    if (backend && !put(&b, NBD_ATTR_BACKEND_IDENTIFIER, backend, strlen(backend) + 1)) r = -EMSGSIZE;
    if (r == 0) r = put_sockets(&b, fds, nfds);
    if (r < 0) { close(fd); return -EMSGSIZE; }
    r = transact(fd, &b, NULL, NULL);
    close(fd);
    return r;
}

int hs_nbd_disconnect(int index) {
    int fd, fam = nbd_family(&fd);
    if (fam < 0) return fam;
    nlmsg_buf b;
    msg_init(&b, (uint16_t)fam, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
    put_u32(&b, NBD_ATTR_INDEX, (uint32_t)index);
    int r = transact(fd, &b, NULL, NULL);
    close(fd);
    return r;
}

typedef struct { int want; int connected; int found; } status_ctx;
static void device_attr(const struct nlattr *a, void *ctx) {
    status_ctx *s = ctx;
    int t = a->nla_type & NLA_TYPE_MASK;
    if (t == NBD_DEVICE_INDEX && attr_len(a) >= 4) s->found = (int)*(const uint32_t *)attr_data(a) == s->want;
    if (t == NBD_DEVICE_CONNECTED && attr_len(a) >= 1 && s->found == 1) s->connected = *(const uint8_t *)attr_data(a);
}
static void item_attr(const struct nlattr *a, void *ctx) {
    if ((a->nla_type & NLA_TYPE_MASK) == NBD_DEVICE_ITEM) {
        status_ctx *s = ctx;
        status_ctx one = { .want = s->want, .connected = 0, .found = 0 };
        each_attr(attr_data(a), attr_len(a), device_attr, &one);
        if (one.found) { s->found = 1; s->connected = one.connected; }
    }
}
static void list_attr(const struct nlattr *a, void *ctx) {
    if ((a->nla_type & NLA_TYPE_MASK) == NBD_ATTR_DEVICE_LIST)
        each_attr(attr_data(a), attr_len(a), item_attr, ctx);
}

int hs_nbd_status(int index, int *connected) {
    int fd, fam = nbd_family(&fd);
    if (fam < 0) return fam;
    nlmsg_buf b;
    msg_init(&b, (uint16_t)fam, NBD_CMD_STATUS, NBD_GENL_VERSION);
    put_u32(&b, NBD_ATTR_INDEX, (uint32_t)index);
    status_ctx s = { .want = index, .connected = 0, .found = 0 };
    int r = transact(fd, &b, list_attr, &s);
    close(fd);
    if (r < 0) return r;
    if (!s.found) return -ENOENT;
    *connected = s.connected;
    return 0;
}
