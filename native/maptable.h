/*
 * The table of IOVA ranges mapped in a VFIO container, asked per command by the queue engine:
 * a data buffer is submitted only when every byte of it is mapped.
 */
#ifndef IDMA_MAPTABLE_H
#define IDMA_MAPTABLE_H
#include <stdint.h>

/* CDEF BEGIN */
struct idma_maptable;

struct idma_maptable *idma_maptable_new(void);
void idma_maptable_free(struct idma_maptable *t);
/* Record a mapping [iova, iova+len). Mappings never overlap (VFIO refuses that).
 * 0 on success, -1 on overlap or len 0, -2 when out of memory. */
int idma_maptable_add(struct idma_maptable *t, uint64_t iova, uint64_t len);
/* Forget exactly the mapping that starts at iova with length len: 0, or -1 if absent. */
int idma_maptable_remove(struct idma_maptable *t, uint64_t iova, uint64_t len);
/* 1 when [iova, iova+len) is covered by one or more adjacent mappings, else 0. */
int idma_maptable_contains(const struct idma_maptable *t, uint64_t iova, uint64_t len);
uint32_t idma_maptable_count(const struct idma_maptable *t);
/* CDEF END */

#endif
