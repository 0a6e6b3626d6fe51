/* Sorted array of disjoint mappings; lookups are a binary search (the per-command path). */
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include "maptable.h"

struct range { uint64_t start, end; };          /* [start, end) */

/*
 * Readers (contains/count: every submitted command) and writers (add/remove: map and unmap)
 * share `rw`: the number of readers inside, plus WRITER while a writer is in. A reader enters
 * with one atomic add when no writer is in (two atomic instructions a lookup, where a POSIX
 * rwlock costs some sixty instructions of library calls); when one is, it backs out and
 * sleeps on the writers' mutex until that writer is done. A writer takes the mutex (writers
 * one at a time), sets WRITER, then waits for the readers inside (a short binary search) to
 * leave. Every reader/writer pair is ordered by the atomic read-modify-writes on `rw`.
 */
#define WRITER 0x80000000u

struct idma_maptable {
    pthread_mutex_t wlock;      /* writers: add/remove */
    uint32_t rw;                /* atomic: readers inside | WRITER */
    uint32_t gen;               /* atomic: bumped by every writer before it changes the table
                                 * (never 0, so an empty cache never matches) */
    uint32_t refs;              /* atomic */
    struct range *r;
    uint32_t n, cap;
};

struct idma_maptable *idma_maptable_new(void)
{
    struct idma_maptable *t = calloc(1, sizeof(*t));

    if (!t)
        return NULL;
    if (pthread_mutex_init(&t->wlock, NULL) != 0) {
        free(t);
        return NULL;
    }
    t->refs = 1;
    t->gen = 1;
    return t;
}

struct idma_maptable *idma_maptable_ref(struct idma_maptable *t)
{
    if (t)
        __atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
    return t;
}

void idma_maptable_free(struct idma_maptable *t)
{
    if (!t || __atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    pthread_mutex_destroy(&t->wlock);
    free(t->r);
    free(t);
}

uint32_t idma_maptable_refs(struct idma_maptable *t)
{
    return __atomic_load_n(&t->refs, __ATOMIC_RELAXED);
}

static inline void read_lock(struct idma_maptable *t)
{
    while (__atomic_add_fetch(&t->rw, 1, __ATOMIC_ACQUIRE) & WRITER) {
        __atomic_sub_fetch(&t->rw, 1, __ATOMIC_RELAXED);   /* back out, wait for the writer */
        pthread_mutex_lock(&t->wlock);
        pthread_mutex_unlock(&t->wlock);
    }
}

static inline void read_unlock(struct idma_maptable *t)
{
    __atomic_sub_fetch(&t->rw, 1, __ATOMIC_RELEASE);
}

static void write_lock(struct idma_maptable *t)
{
    pthread_mutex_lock(&t->wlock);
    __atomic_fetch_or(&t->rw, WRITER, __ATOMIC_ACQUIRE);
    while (__atomic_load_n(&t->rw, __ATOMIC_ACQUIRE) != WRITER)
        sched_yield();                  /* readers inside: each is one lookup from leaving */
    /* Invalidate every cache before the table changes: a cached check that still read the
     * old generation happened before this writer, like a lookup that left before it. */
    uint32_t gen = t->gen + 1;
    __atomic_store_n(&t->gen, gen ? gen : 1, __ATOMIC_SEQ_CST);
}

static void write_unlock(struct idma_maptable *t)
{
    __atomic_fetch_and(&t->rw, ~WRITER, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&t->wlock);
}

/* Index of the first range whose start is greater than iova. */
static uint32_t upper(const struct idma_maptable *t, uint64_t iova)
{
    uint32_t lo = 0, hi = t->n;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (t->r[mid].start <= iova)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int grow(struct idma_maptable *t)
{
    uint32_t cap = t->cap ? t->cap * 2 : 64;
    struct range *r;

    if (cap < t->cap)
        return -2;
    r = realloc(t->r, (size_t)cap * sizeof(*r));
    if (!r)
        return -2;
    t->r = r;
    t->cap = cap;
    return 0;
}

static int add_locked(struct idma_maptable *t, uint64_t iova, uint64_t end)
{
    uint32_t i = upper(t, iova);

    if ((i > 0 && t->r[i - 1].end > iova) || (i < t->n && t->r[i].start < end))
        return -1;
    if (t->n == t->cap && grow(t) < 0)
        return -2;
    memmove(&t->r[i + 1], &t->r[i], (t->n - i) * sizeof(*t->r));
    t->r[i].start = iova;
    t->r[i].end = end;
    t->n++;
    return 0;
}

int idma_maptable_add(struct idma_maptable *t, uint64_t iova, uint64_t len)
{
    uint64_t end = iova + len;
    int rc;

    if (len == 0 || end < iova)
        return -1;
    write_lock(t);
    rc = add_locked(t, iova, end);
    write_unlock(t);
    return rc;
}

int idma_maptable_remove(struct idma_maptable *t, uint64_t iova, uint64_t len)
{
    uint32_t i;
    int rc = -1;

    write_lock(t);
    i = upper(t, iova);
    if (i > 0 && t->r[i - 1].start == iova && t->r[i - 1].end == iova + len) {
        i--;
        memmove(&t->r[i], &t->r[i + 1], (t->n - i - 1) * sizeof(*t->r));
        t->n--;
        rc = 0;
    }
    write_unlock(t);
    return rc;
}

static int contains_locked(const struct idma_maptable *t, uint64_t iova, uint64_t end)
{
    uint32_t i = upper(t, iova);

    if (i == 0)
        return 0;
    for (i--; i < t->n && t->r[i].start <= iova; i++) {
        if (t->r[i].end >= end)
            return 1;
        iova = t->r[i].end;             /* continue into an adjacent mapping */
    }
    return 0;
}

int idma_maptable_contains(struct idma_maptable *t, uint64_t iova, uint64_t len)
{
    uint64_t end = iova + len;
    int rc;

    if (len == 0 || end < iova)
        return 0;
    read_lock(t);
    rc = contains_locked(t, iova, end);
    read_unlock(t);
    return rc;
}

uint32_t idma_maptable_count(struct idma_maptable *t)
{
    uint32_t n;

    read_lock(t);
    n = t->n;
    read_unlock(t);
    return n;
}

/* The one mapping covering [iova, end), or 0 when none alone does (adjacent mappings). */
static int covering_locked(const struct idma_maptable *t, uint64_t iova, uint64_t end,
                           struct range *out)
{
    uint32_t i = upper(t, iova);

    if (i == 0 || t->r[i - 1].end < end)
        return 0;
    *out = t->r[i - 1];
    return 1;
}

int idma_maptable_contains_cached(struct idma_maptable *t, uint64_t iova, uint64_t len,
                                  struct idma_mapcache *c)
{
    uint64_t end = iova + len;
    struct range hit;
    uint32_t gen;
    int rc;

    if (len == 0 || end < iova)
        return 0;
    if (idma_mapcache_hit(c, &t->gen, iova, end))
        return 1;
    read_lock(t);
    gen = __atomic_load_n(&t->gen, __ATOMIC_RELAXED);   /* stable while a reader is inside */
    if (covering_locked(t, iova, end, &hit)) {
        c->gen = gen;
        c->start = hit.start;
        c->end = hit.end;
        rc = 1;
    } else {
        rc = contains_locked(t, iova, end);
    }
    read_unlock(t);
    return rc;
}

const uint32_t *idma_maptable_gen(const struct idma_maptable *t)
{
    return &t->gen;
}
