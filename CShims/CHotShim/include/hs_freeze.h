/* FIFREEZE / FITHAW on a mounted filesystem (fd of its mount point). */
#ifndef HS_FREEZE_H
#define HS_FREEZE_H
int hs_fifreeze(int fd);
int hs_fithaw(int fd);
#endif
