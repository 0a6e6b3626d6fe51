/*
 * The table of IOVA ranges mapped in a VFIO container, asked per command by the queue engine:
 * a data buffer is submitted only when every byte of it is mapped.
 * Thread safe: lookups take a read lock, add/remove the write lock. Reference counted: the
 * container holds one reference, every queue pair using the table holds another.
 */
#ifndef IDMA_MAPTABLE_H
#define IDMA_MAPTABLE_H
#include <stdint.h>

/* CDEF BEGIN */
struct idma_maptable;

/* A new empty table holding one reference (NULL when out of memory). */
struct idma_maptable *idma_maptable_new(void);
/* Take one more reference; returns t. */
struct idma_maptable *idma_maptable_ref(struct idma_maptable *t);
/* Drop one reference; the table is freed when the last one goes. NULL is ignored. */
void idma_maptable_free(struct idma_maptable *t);
/* Record a mapping [iova, iova+len). Mappings never overlap (VFIO refuses that).
 * 0 on success, -1 on overlap or len 0, -2 when out of memory. */
int idma_maptable_add(struct idma_maptable *t, uint64_t iova, uint64_t len);
/* Forget exactly the mapping that starts at iova with length len: 0, or -1 if absent. */
int idma_maptable_remove(struct idma_maptable *t, uint64_t iova, uint64_t len);
/* 1 when [iova, iova+len) is covered by one or more adjacent mappings, else 0. */
int idma_maptable_contains(struct idma_maptable *t, uint64_t iova, uint64_t len);
uint32_t idma_maptable_count(struct idma_maptable *t);
/* Current reference count (for tests). */
uint32_t idma_maptable_refs(struct idma_maptable *t);
/* CDEF END */

/* A lookup cache for one single-threaded user (a queue pair): the mapping that covered the
 * last buffer, valid while the table's generation is unchanged. Zeroed = empty. */
struct idma_mapcache {
    uint32_t gen;
    uint64_t start, end;
};

/* idma_maptable_contains through cache c: a buffer inside the cached mapping costs one
 * atomic load of the generation (every add/remove bumps it before changing the table). */
int idma_maptable_contains_cached(struct idma_maptable *t, uint64_t iova, uint64_t len,
                                  struct idma_mapcache *c);
/* The table's generation word, for an inline check of a cache against it (see
 * idma_mapcache_hit); valid while the caller holds a reference to the table. */
const uint32_t *idma_maptable_gen(const struct idma_maptable *t);

/* 1 when [iova, iova+len) lies in c's mapping and gen (idma_maptable_gen) still equals the
 * generation c was filled at; len > 0 and no wrap are the caller's to check. */
static inline int idma_mapcache_hit(const struct idma_mapcache *c, const uint32_t *gen,
                                    uint64_t iova, uint64_t end)
{
    return __atomic_load_n(gen, __ATOMIC_ACQUIRE) == c->gen && iova >= c->start &&
           end <= c->end;
}

#endif
