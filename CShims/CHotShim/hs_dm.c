/* libdevmapper glue (hs_dm.h): the log trampoline and dm_names accessors. */
#include "include/hs_dm.h"
#include <libdevmapper.h>
#include <stdarg.h>
#include <stdio.h>

static hs_dm_log_sink hs_sink;

__attribute__((format(printf, 5, 6)))
static void hs_dm_trampoline(int level, const char *file, int line, int dm_errno_or_class,
                             const char *f, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(msg, sizeof msg, f, ap);
    va_end(ap);
    hs_dm_log_sink s = hs_sink;
    if (s) s(level, file, line, dm_errno_or_class, msg);
}

void hs_dm_set_log_sink(hs_dm_log_sink sink) {
    hs_sink = sink;
    dm_log_with_errno_init(sink ? hs_dm_trampoline : NULL);
}

uint64_t hs_dm_names_dev(const void *names) { return ((const struct dm_names *)names)->dev; }
const char *hs_dm_names_name(const void *names) { return ((const struct dm_names *)names)->name; }
const void *hs_dm_names_next(const void *names) {
    const struct dm_names *n = names;
    if (n->next == 0) return NULL;
    return (const char *)n + n->next;
}
