/* Sorted array of disjoint mappings; lookups are a binary search (the per-command path). */
#include <stdlib.h>
#include <string.h>
#include "maptable.h"

struct range { uint64_t start, end; };          /* [start, end) */

struct idma_maptable {
    struct range *r;
    uint32_t n, cap;
};

struct idma_maptable *idma_maptable_new(void)
{
    return calloc(1, sizeof(struct idma_maptable));
}

void idma_maptable_free(struct idma_maptable *t)
{
    if (t) {
        free(t->r);
        free(t);
    }
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

int idma_maptable_add(struct idma_maptable *t, uint64_t iova, uint64_t len)
{
    uint64_t end = iova + len;
    uint32_t i;

    if (len == 0 || end < iova)
        return -1;
    i = upper(t, iova);
    if ((i > 0 && t->r[i - 1].end > iova) || (i < t->n && t->r[i].start < end))
        return -1;
    if (t->n == t->cap) {
        uint32_t cap = t->cap ? t->cap * 2 : 64;
        struct range *r = realloc(t->r, cap * sizeof(*r));
        if (!r)
            return -2;
        t->r = r;
        t->cap = cap;
    }
    memmove(&t->r[i + 1], &t->r[i], (t->n - i) * sizeof(*t->r));
    t->r[i].start = iova;
    t->r[i].end = end;
    t->n++;
    return 0;
}

int idma_maptable_remove(struct idma_maptable *t, uint64_t iova, uint64_t len)
{
    uint32_t i = upper(t, iova);

    if (i == 0 || t->r[i - 1].start != iova || t->r[i - 1].end != iova + len)
        return -1;
    i--;
    memmove(&t->r[i], &t->r[i + 1], (t->n - i - 1) * sizeof(*t->r));
    t->n--;
    return 0;
}

int idma_maptable_contains(const struct idma_maptable *t, uint64_t iova, uint64_t len)
{
    uint64_t end = iova + len;
    uint32_t i = upper(t, iova);

    if (len == 0 || end < iova || i == 0)
        return 0;
    for (i--; i < t->n && t->r[i].start <= iova; i++) {
        if (t->r[i].end >= end)
            return 1;
        iova = t->r[i].end;             /* continue into an adjacent mapping */
    }
    return 0;
}

uint32_t idma_maptable_count(const struct idma_maptable *t)
{
    return t->n;
}
