/*
 * iommu-dma native engine: the NVMe hot path (rings, PRPs, doorbells, polling).
 * Declarations between the CDEF markers are read by native/build.py for cffi.
 */
#ifndef IDMA_ENGINE_H
#define IDMA_ENGINE_H
#include <stdint.h>
#include <stddef.h>

/* CDEF BEGIN */
const char *idma_version(void);

/*
 * Build the PRP entries of one transfer (NVMe Base 2.0, 4.1.1 "PRP Entry and PRP List").
 * addr: IOVA of the data (IOVA = VA), dword aligned; len > 0 bytes; page_size: CC.MPS page.
 * list/list_iova: a page-aligned PRP list area of list_slots entries (several pages are chained:
 * the last entry of a full list page points at the next one). The rest of the last list page
 * used is zeroed and PRP2 is 0 when unused, so a device that moves more than described reaches
 * IOVA 0 (never mapped) rather than pages of an earlier command.
 * Returns the number of list slots written (0 when PRP2 is a data pointer or unused),
 * or -1 when the address is misaligned, -2 when len is 0, -3 when the list is too small (or
 * addr + len wraps), -4 when page_size is not a power of two >= 4096.
 */
int idma_prp_build(uint64_t addr, uint64_t len, uint32_t page_size,
                   uint64_t *list, uint64_t list_iova, uint32_t list_slots,
                   uint64_t *prp1, uint64_t *prp2);
/* CDEF END */

#endif
