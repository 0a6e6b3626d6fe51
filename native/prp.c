/* PRP construction, NVMe Base Specification 2.0, section 4.1.1. */
#include <string.h>
#include "engine.h"

/* Zero the list entries after the last one written, up to the end of its list page. */
static void clear_tail(uint64_t *list, uint64_t used, uint64_t per_page, uint32_t list_slots)
{
    uint64_t end = (used + per_page - 1) / per_page * per_page;

    if (end > list_slots)
        end = list_slots;
    if (end > used)
        memset(&list[used], 0, (end - used) * sizeof(*list));
}

int idma_prp_build(uint64_t addr, uint64_t len, uint32_t page_size,
                   uint64_t *list, uint64_t list_iova, uint32_t list_slots,
                   uint64_t *prp1, uint64_t *prp2)
{
    uint64_t mask = (uint64_t)page_size - 1;
    uint64_t first = page_size - (addr & mask);   /* bytes PRP1 covers */
    uint64_t per_page = page_size / sizeof(uint64_t);
    uint64_t page, end, slot = 0;

    if (page_size < 4096 || (page_size & mask))   /* CC.MPS: 2^(12+MPS) */
        return -4;
    if (addr & 3)                                 /* 4.1.1: PRP1 offset is dword aligned */
        return -1;
    if (len == 0)
        return -2;
    if (addr + len < addr)
        return -3;
    *prp1 = addr;
    *prp2 = 0;                                    /* unused PRP2 stays 0 */
    if (len <= first)
        return 0;
    page = (addr + first);                        /* later entries are page aligned */
    end = addr + len;
    if (end - page <= page_size) {                /* exactly two pages: PRP2 is data */
        *prp2 = page;
        return 0;
    }
    if (!list)
        return -3;
    for (; page < end; page += page_size) {
        /* The last slot of a full list page chains to the next list page. */
        if ((slot % per_page) == per_page - 1 && end - page > page_size) {
            if (slot + 1 >= list_slots)
                return -3;
            list[slot] = list_iova + (slot + 1) * sizeof(uint64_t);
            slot++;
        }
        if (slot >= list_slots)
            return -3;
        list[slot++] = page;
    }
    clear_tail(list, slot, per_page, list_slots);
    *prp2 = list_iova;
    return (int)slot;
}
