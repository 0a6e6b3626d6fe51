/*
 * NVMe I/O queue pair engine (NVMe Base 2.0 §3.3 queue mechanics, §4.2 SQE, §4.6 CQE).
 * One submission queue and its completion queue, used by one thread at a time.
 * IOVA = VA in this project: every pointer handed in is also its bus address.
 */
#ifndef IDMA_QUEUE_H
#define IDMA_QUEUE_H
#include <stdint.h>
#include "maptable.h"

/* CDEF BEGIN */
/* Return codes of the queue engine and the worker (0 or a count on success). */
enum idma_rc {
    IDMA_OK = 0,
    IDMA_EINVAL = -1,       /* bad argument */
    IDMA_EUNMAPPED = -2,    /* a data buffer is not inside the container's mapped ranges */
    IDMA_EALIGN = -3,       /* data buffer not dword aligned (PRP1 rule, §4.1.1) */
    IDMA_ETOOBIG = -4,      /* transfer needs more PRP list entries than a tracker owns */
    IDMA_ETIMEDOUT = -5,    /* worker: outstanding I/O never completed */
    IDMA_ENOMEM = -6
};

/* Submission Queue Entry, 64 bytes (NVMe Base 2.0 §4.2, Figure 88). */
struct idma_sqe {
    uint32_t cdw0;          /* opcode 7:0, FUSE 9:8, PSDT 15:14, CID 31:16 */
    uint32_t nsid;
    uint32_t cdw2;
    uint32_t cdw3;
    uint64_t mptr;
    uint64_t prp1;          /* DPTR: PRP entry 1 */
    uint64_t prp2;          /* DPTR: PRP entry 2 or PRP list pointer */
    uint32_t cdw10;
    uint32_t cdw11;
    uint32_t cdw12;
    uint32_t cdw13;
    uint32_t cdw14;
    uint32_t cdw15;
};

/* Completion Queue Entry, 16 bytes (NVMe Base 2.0 §4.6, Figure 91). */
struct idma_cqe {
    uint32_t dw0;           /* command specific result */
    uint32_t dw1;
    uint16_t sq_head;       /* DW2 15:0 */
    uint16_t sq_id;         /* DW2 31:16 */
    uint16_t cid;           /* DW3 15:0 */
    uint16_t status;        /* DW3 31:16: phase tag bit 0, status field bits 15:1 */
};

/* Data buffer and caller tag of one submitted command. len 0: no data, the SQE's PRP1/PRP2
 * are copied unchanged (e.g. Create I/O CQ/SQ with a contiguous queue in PRP1). */
struct idma_io {
    uint64_t buf;           /* IOVA (= VA) of the data, dword aligned */
    uint64_t len;           /* bytes */
    uint64_t tag;           /* returned in the completion */
};

/* One reaped completion. status: the 15-bit status field (SC 7:0, SCT 10:8, CRD 12:11,
 * More 13, DNR 14); 0 means success. */
struct idma_cpl {
    uint64_t tag;
    uint32_t result;
    uint16_t cid;
    uint16_t status;
};

/* Snapshot of a queue pair's state (for tests and diagnostics). */
struct idma_qpair_info {
    uint16_t qid;
    uint16_t phase;         /* expected phase tag of the next CQE */
    uint32_t depth;         /* entries in each ring */
    uint32_t trackers;      /* depth - 1 */
    uint32_t free;          /* trackers not in flight */
    uint32_t sq_tail;
    uint32_t sq_head;       /* last SQ head reported by the controller */
    uint32_t cq_head;
    uint32_t list_slots;    /* PRP list entries per tracker */
    uint64_t submitted;
    uint64_t completed;
    uint64_t spurious;      /* CQEs naming a CID that was not in flight (skipped) */
    uint64_t sq_doorbells;  /* SQ tail doorbell writes */
    uint64_t cq_doorbells;  /* CQ head doorbell writes */
};

struct idma_qpair;

/*
 * Create a queue pair over caller-owned memory. sq: depth * 64 bytes, cq: depth * 16 bytes,
 * both aligned to page_size and zeroed by the caller before the controller sees them.
 * bar0: mapped BAR0 (doorbells at 0x1000 + ...). dstrd: CAP.DSTRD. page_size: CC.MPS page.
 * list_area: list_pages page-aligned pages of PRP lists split evenly between the depth-1
 * trackers (may be NULL/0: transfers then limited to two pages). maptable: NULL = no check.
 * Returns NULL on a bad argument or out of memory.
 */
struct idma_qpair *idma_qpair_new(uint16_t qid, uint32_t depth, void *sq, void *cq,
                                  volatile uint8_t *bar0, uint32_t dstrd, uint32_t page_size,
                                  void *list_area, uint32_t list_pages,
                                  const struct idma_maptable *maptable);
void idma_qpair_free(struct idma_qpair *q);

/*
 * Submit up to n commands (cmds[i] with data io[i]); CIDs and PRPs are filled in by the engine.
 * Returns how many were queued (< n when fewer trackers are free: retry the rest after polling),
 * or a negative idma_rc when a command in the accepted prefix is refused; then nothing is
 * queued and idma_qpair_bad_index() names the refused command. One SQ doorbell write per call.
 */
int idma_qpair_submit(struct idma_qpair *q, const struct idma_sqe *cmds,
                      const struct idma_io *io, uint32_t n);
/* Index in the last submit call of the refused command, or -1. */
int idma_qpair_bad_index(const struct idma_qpair *q);

/* Reap up to max completions without waiting; one CQ doorbell write if any. Returns count. */
int idma_qpair_poll(struct idma_qpair *q, struct idma_cpl *out, uint32_t max);
/*
 * Busy-poll until at least min completions (capped at max and at the commands in flight) or
 * timeout_ns elapsed; polls at least once. Returns the number reaped (may be < min on timeout).
 */
int idma_qpair_wait(struct idma_qpair *q, struct idma_cpl *out, uint32_t max, uint32_t min,
                    uint64_t timeout_ns);

uint32_t idma_qpair_inflight(const struct idma_qpair *q);
void idma_qpair_get_info(const struct idma_qpair *q, struct idma_qpair_info *out);
/* Byte offsets of the SQ tail / CQ head doorbells in BAR0 (§3.1.3: 0x1000 + (2y[+1]) stride). */
uint32_t idma_sq_doorbell_offset(uint16_t qid, uint32_t dstrd);
uint32_t idma_cq_doorbell_offset(uint16_t qid, uint32_t dstrd);
/* CDEF END */

/* For the worker (C only): monotonic clock in ns. */
uint64_t idma_now_ns(void);

#endif
