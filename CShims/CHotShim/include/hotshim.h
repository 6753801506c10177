/* CHotShim: the C glue hotimage needs because Swift cannot express it:
 * ioctl request numbers (macros Swift does not import), variadic calls
 * (ioctl, prctl), and kernel structs with their exact layout.
 * No logic lives here. Every symbol starts with hs_ / HS_. */
#ifndef HOTSHIM_H
#define HOTSHIM_H
#include "hs_blkdev.h"
#include "hs_freeze.h"
#include "hs_fsmap.h"
#include "hs_fiemap.h"
#include "hs_loop.h"
#include "hs_process.h"
#include "hs_file.h"
#include "hs_nbd.h"
#include "hs_dm.h"
#endif
