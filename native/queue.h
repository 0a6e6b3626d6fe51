/*
 * NVMe I/O queue pair engine (NVMe Base 2.0 §3.3 queue mechanics, §4.2 SQE, §4.6 CQE).
 * One submission queue and its completion queue, used by one thread at a time: every call that
 * moves the rings claims the queue pair with an atomic flag and returns IDMA_EBUSY when another
 * thread holds it (detection of misuse, not a lock: the loser is refused, never blocked).
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
    IDMA_ENOMEM = -6,
    IDMA_EBUSY = -7,        /* another thread is inside a call on this queue pair right now */
    IDMA_ECLOSED = -8       /* the queue pair was quiesced (its queue deleted or closed) */
};

/* Largest ring: a CID is a 4-bit generation over a 12-bit tracker index. */
enum { IDMA_MAX_DEPTH = 4096, IDMA_CID_INDEX_BITS = 12 };

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
 * are copied unchanged (e.g. Create I/O CQ/SQ with a contiguous queue in PRP1). mlen 0: no
 * separate metadata, MPTR is 0; otherwise MPTR = mbuf, checked like the data (NVMe Base 2.0
 * §4.2: MPTR of a contiguous metadata buffer, dword aligned). Zero-initialize: fields may be
 * added at the end. */
struct idma_io {
    uint64_t buf;           /* IOVA (= VA) of the data, dword aligned */
    uint64_t len;           /* bytes */
    uint64_t tag;           /* returned in the completion */
    uint64_t mbuf;          /* IOVA (= VA) of the command's metadata, dword aligned */
    uint64_t mlen;          /* its bytes (0: none) */
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
    uint64_t spurious;      /* CQEs dropped: CID not in flight (free tracker or stale
                             * generation), SQ head or SQ id out of range */
    uint64_t sq_doorbells;  /* SQ tail doorbell updates (shadow or MMIO) */
    uint64_t cq_doorbells;  /* CQ head doorbell updates (shadow or MMIO) */
    uint64_t sq_mmio;       /* of those, SQ tail writes that reached BAR0 */
    uint64_t cq_mmio;       /* of those, CQ head writes that reached BAR0 */
    uint32_t shadow;        /* 1: shadow doorbells in use */
    uint32_t cq_batch;      /* CQ head MMIO deferred up to this many CQEs (0/1: every poll) */
    uint32_t sgl;           /* 1: data described by an SGL Data Block descriptor, 0: PRPs */
};

struct idma_qpair;

/*
 * Create a queue pair over caller-owned memory. depth: 2..IDMA_MAX_DEPTH entries per ring.
 * sq: depth * 64 bytes, cq: depth * 16 bytes, both aligned to page_size and zeroed by the caller
 * before the controller sees them. bar0/bar0_size: mapped BAR0; both doorbells of qid
 * (0x1000 + ... << CAP.DSTRD, §3.1.3) must lie inside it. dstrd: CAP.DSTRD. page_size: CC.MPS
 * page. list_area: list_pages page-aligned pages of PRP lists split evenly between the depth-1
 * trackers (may be NULL/0: transfers then limited to two pages). maptable: NULL = no check,
 * else the queue pair holds a reference to it until idma_qpair_free.
 * Returns NULL on a bad argument or out of memory.
 */
struct idma_qpair *idma_qpair_new(uint16_t qid, uint32_t depth, void *sq, void *cq,
                                  volatile uint8_t *bar0, uint64_t bar0_size, uint32_t dstrd,
                                  uint32_t page_size, void *list_area, uint32_t list_pages,
                                  struct idma_maptable *maptable);
void idma_qpair_free(struct idma_qpair *q);
/*
 * Close a queue pair for good before its memory goes: every call entering from now on returns
 * IDMA_ECLOSED, a running worker ends at its next poll (rc IDMA_ECLOSED), and this waits
 * (sleeping) until no call is inside. Afterwards idma_qpair_free is safe. Called without the
 * GIL, so a worker thread can finish.
 */
void idma_qpair_quiesce(struct idma_qpair *q);

/*
 * Submit up to n commands (cmds[i] with data io[i], arrays of at least n entries); CIDs and
 * PRPs are filled in by the engine. Returns how many were queued (< n when fewer trackers are
 * free: retry the rest after polling), or a negative idma_rc when a command in the accepted
 * prefix is refused; then nothing is queued and idma_qpair_bad_index() names the refused
 * command. One SQ doorbell write per call. IDMA_EBUSY: another thread is in this queue pair.
 */
int idma_qpair_submit(struct idma_qpair *q, const struct idma_sqe *cmds,
                      const struct idma_io *io, uint32_t n);
/* The CID of the in-flight command submitted with tag, or -1 (for Abort, §5.1). Call with
 * the queue pair otherwise idle (the caller's lock). */
int idma_qpair_find_cid(const struct idma_qpair *q, uint64_t tag);
/* Like idma_qpair_submit, but each SQE goes to the device as given (PRP1/PRP2, MPTR, PSDT
 * untouched, no mapped-range check) with tags[i] for its completion. UNSAFE: for tests that
 * show what the IOMMU does with a pointer we did not map. The checked call above always
 * replaces those fields with PRPs built from the checked buffer (or zeroes). */
int idma_qpair_submit_unchecked(struct idma_qpair *q, const struct idma_sqe *cmds,
                                const uint64_t *tags, uint32_t n);
/* Index in the last submit call of the refused command, or -1. */
int idma_qpair_bad_index(const struct idma_qpair *q);

/* Reap up to max completions into out[max] without waiting; one CQ doorbell write if any.
 * Consumes at most depth CQEs per call. Returns the count, or IDMA_EBUSY. */
int idma_qpair_poll(struct idma_qpair *q, struct idma_cpl *out, uint32_t max);
/*
 * Busy-poll until at least min completions (capped at max and at the commands in flight) or
 * timeout_ns elapsed; polls at least once. Returns the number reaped (may be < min on timeout),
 * or IDMA_EBUSY.
 */
int idma_qpair_wait(struct idma_qpair *q, struct idma_cpl *out, uint32_t max, uint32_t min,
                    uint64_t timeout_ns);

/*
 * Shadow doorbells (Doorbell Buffer Config, NVMe Base 2.0 §5.8): shadow_db and eventidx are the
 * page-sized buffers given to the controller in PRP1/PRP2; this queue uses their dwords at the
 * doorbell offsets of qid (SQ tail 2*qid, CQ head 2*qid+1, times 4 << DSTRD bytes). From now
 * on tails/heads go to the shadow page and BAR0 is written only when the controller's EventIdx
 * asks for it, or always when mmio_always is set (admin queue: some controllers keep reading
 * its MMIO doorbells). The first SQ doorbell after this call always reaches BAR0 (the EventIdx
 * dword may be stale from a deleted queue). Both NULL: back to MMIO doorbells only.
 * Returns 0, IDMA_EINVAL or IDMA_EBUSY.
 */
int idma_qpair_set_shadow(struct idma_qpair *q, uint32_t *shadow_db, uint32_t *eventidx,
                          int mmio_always);
/*
 * Defer CQ head MMIO writes (§3.3.1.2: the host may consume several entries before it updates
 * the CQ head doorbell) for a polled queue: the head is written when `batch` consumed entries
 * are unannounced, and always before a submission that could let the controller see a full CQ
 * (unannounced + in flight > depth - 1), so the controller never stalls. 0 or 1: every poll.
 */
void idma_qpair_set_cq_batch(struct idma_qpair *q, uint32_t batch);
/*
 * Data pointer type of this queue's commands with data (§4.1.2, CDW0 PSDT): 0 = PRPs, 1 =
 * SGL: one SGL Data Block descriptor in DPTR (address + 32-bit length) covering the whole
 * buffer, which IOVA = VA makes contiguous; PSDT 01b, so MPTR stays a plain address. Only for
 * I/O queues of a controller whose Identify SGLS allows SGLs (admin commands use PRPs over
 * PCIe). Returns 0, IDMA_EINVAL or IDMA_EBUSY.
 */
int idma_qpair_set_sgl(struct idma_qpair *q, uint32_t sgl);

/*
 * Fast path for reads/writes without per-command structs: n commands of opcode (01h Write,
 * 02h Read, NVM Command Set 1.0 §3.3) of nlb blocks each on nsid; command i reads/writes
 * LBA lbas[i] into buffer buf_base + tags[i] * buf_stride (nlb * lba_size bytes) and carries
 * tags[i]. lbas and tags hold at least n entries. Same return values and one SQ doorbell as
 * idma_qpair_submit (EINVAL also for nlb outside 1..65536 or lba_size 0).
 */
int idma_qpair_submit_rw(struct idma_qpair *q, uint8_t opcode, uint32_t nsid, uint32_t nlb,
                         uint32_t lba_size, const uint64_t *lbas, const uint64_t *tags,
                         uint32_t n, uint64_t buf_base, uint64_t buf_stride);
/*
 * Like idma_qpair_wait, but stores only tags[i] and status[i] (15-bit status field, 0 = ok)
 * of each completion into caller arrays of max entries. Returns the count, or IDMA_EBUSY.
 */
int idma_qpair_wait_tags(struct idma_qpair *q, uint64_t *tags, uint16_t *status, uint32_t max,
                         uint32_t min, uint64_t timeout_ns);

uint32_t idma_qpair_inflight(const struct idma_qpair *q);
void idma_qpair_get_info(const struct idma_qpair *q, struct idma_qpair_info *out);
/* Byte offsets of the SQ tail / CQ head doorbells in BAR0 (§3.1.3: 0x1000 + (2y[+1]) stride).
 * 64-bit: with CAP.DSTRD 15 and a large qid the offset does not fit 32 bits. */
uint64_t idma_sq_doorbell_offset(uint16_t qid, uint32_t dstrd);
uint64_t idma_cq_doorbell_offset(uint16_t qid, uint32_t dstrd);
/* Monotonic clock in ns; idma_fast_ns reads it without a system call where it can
 * (calibrated TSC on x86-64; the first call in the process takes 5 ms to calibrate, once,
 * under pthread_once, whichever threads call it first). */
uint64_t idma_now_ns(void);
uint64_t idma_fast_ns(void);
/* CDEF END */

/*
 * For the worker (C only): hold the queue pair for a whole run. idma_qpair_claim returns 0,
 * IDMA_EBUSY or IDMA_ECLOSED; while claimed, use the _claimed variants (the public calls would
 * see it busy), and end the run when idma_qpair_dead() says the queue pair is being closed.
 */
int idma_qpair_claim(struct idma_qpair *q);
void idma_qpair_release(struct idma_qpair *q);
int idma_qpair_dead(const struct idma_qpair *q);
int idma_qpair_submit_claimed(struct idma_qpair *q, const struct idma_sqe *cmds,
                              const struct idma_io *io, uint32_t n);
int idma_qpair_poll_claimed(struct idma_qpair *q, struct idma_cpl *out, uint32_t max);
int idma_qpair_submit_rw_claimed(struct idma_qpair *q, uint8_t opcode, uint32_t nsid,
                                 uint32_t nlb, uint32_t lba_size, const uint64_t *lbas,
                                 const uint64_t *tags, uint32_t n, uint64_t buf_base,
                                 uint64_t buf_stride);

#endif
