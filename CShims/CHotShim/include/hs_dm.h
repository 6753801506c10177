/* libdevmapper glue. Why C: libdevmapper reports through a C variadic
 * callback (dm_log_with_errno_fn), which Swift cannot implement, and its
 * dm_names list ends each entry in a flexible array member, which Swift does
 * not import. The trampoline formats each message with vsnprintf and
 * forwards a plain (level, file, line, errno_or_class, message) to a sink
 * that Swift sets. No logic lives here. */
#ifndef HS_DM_H
#define HS_DM_H
#include <stdint.h>

typedef void (*hs_dm_log_sink)(int level, const char *file, int line,
                               int dm_errno_or_class, const char *message);

/* Routes libdevmapper's log through `sink` (NULL: libdevmapper's default). */
void hs_dm_set_log_sink(hs_dm_log_sink sink);

/* Walking the result of dm_task_get_names (a `struct dm_names *`, passed as
 * void * so this header needs no libdevmapper types). An empty list has
 * dev == 0. */
uint64_t hs_dm_names_dev(const void *names);
const char *hs_dm_names_name(const void *names);
/* The next entry, or NULL after the last. */
const void *hs_dm_names_next(const void *names);
#endif
