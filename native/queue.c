/* NVMe I/O queue pair engine: trackers, PRPs, SQ tail / CQ head doorbells, phase tags. */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "engine.h"
#include "queue.h"

_Static_assert(sizeof(struct idma_sqe) == 64, "SQE is 64 bytes (NVMe 2.0 §4.2)");
_Static_assert(sizeof(struct idma_cqe) == 16, "CQE is 16 bytes (NVMe 2.0 §4.6)");

/*
 * Barriers between DMA memory and MMIO. wmb: SQ entries are globally visible before the
 * doorbell write. rmb: the rest of a CQE is read only after its phase tag was seen.
 */
#if defined(__x86_64__) || defined(__i386__)
#define idma_wmb() __asm__ __volatile__("sfence" ::: "memory")
#define idma_rmb() __asm__ __volatile__("" ::: "memory")    /* x86: loads are not reordered */
#define idma_pause() __asm__ __volatile__("pause")
#elif defined(__aarch64__)
#define idma_wmb() __asm__ __volatile__("dsb st" ::: "memory")
#define idma_rmb() __asm__ __volatile__("dsb ld" ::: "memory")
#define idma_pause() __asm__ __volatile__("yield")
#else
#define idma_wmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define idma_rmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define idma_pause() do { } while (0)
#endif

struct tracker {
    uint64_t tag;
    uint64_t *list;             /* this tracker's PRP list pages (IOVA = address) */
    uint16_t next_free;
    uint8_t busy;
};

struct idma_qpair {
    struct idma_sqe *sq;
    volatile struct idma_cqe *cq;
    volatile uint32_t *sq_db;
    volatile uint32_t *cq_db;
    struct tracker *trk;
    uint64_t *prp;                  /* PRP1/PRP2 scratch of one submit call, 2 per tracker */
    uint32_t depth, ntrk, nfree, list_slots, page_size;
    uint32_t sq_tail, sq_head, cq_head;
    uint16_t qid, phase, free_head;
    int bad_index;
    const struct idma_maptable *maptable;
    uint64_t submitted, completed, spurious, sq_dbs, cq_dbs;
};

#define NO_TRACKER 0xFFFF

uint64_t idma_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint32_t idma_sq_doorbell_offset(uint16_t qid, uint32_t dstrd)
{
    return 0x1000 + (2u * qid) * (4u << dstrd);         /* §3.1.3: SQyTDBL */
}

uint32_t idma_cq_doorbell_offset(uint16_t qid, uint32_t dstrd)
{
    return 0x1000 + (2u * qid + 1) * (4u << dstrd);     /* §3.1.3: CQyHDBL */
}

static int valid_args(uint32_t depth, void *sq, void *cq, volatile uint8_t *bar0,
                      uint32_t dstrd, uint32_t page_size)
{
    uint64_t mask = (uint64_t)page_size - 1;

    if (depth < 2 || depth > 65536 || !sq || !cq || !bar0 || dstrd > 15)
        return 0;
    if (page_size < 4096 || (page_size & mask))         /* CC.MPS: power of two >= 4 KiB */
        return 0;
    return !(((uintptr_t)sq | (uintptr_t)cq) & mask);   /* §3.3: rings are page aligned */
}

static void init_trackers(struct idma_qpair *q, uint8_t *list_area, uint32_t pages_each)
{
    for (uint32_t i = 0; i < q->ntrk; i++) {
        struct tracker *t = &q->trk[i];
        t->list = list_area ? (uint64_t *)(list_area + (uint64_t)i * pages_each * q->page_size)
                            : NULL;
        t->next_free = (uint16_t)(i + 1 < q->ntrk ? i + 1 : NO_TRACKER);
        t->busy = 0;
    }
    q->free_head = 0;
    q->nfree = q->ntrk;
}

struct idma_qpair *idma_qpair_new(uint16_t qid, uint32_t depth, void *sq, void *cq,
                                  volatile uint8_t *bar0, uint32_t dstrd, uint32_t page_size,
                                  void *list_area, uint32_t list_pages,
                                  const struct idma_maptable *maptable)
{
    struct idma_qpair *q;
    uint32_t ntrk = depth - 1, pages_each;

    if (!valid_args(depth, sq, cq, bar0, dstrd, page_size))
        return NULL;
    if (list_area && ((uintptr_t)list_area & (page_size - 1)))
        return NULL;
    pages_each = list_area ? list_pages / ntrk : 0;
    if (list_area && pages_each == 0)                   /* at least one list page each */
        return NULL;
    q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    q->trk = calloc(ntrk, sizeof(*q->trk));
    q->prp = calloc(2 * (size_t)ntrk, sizeof(*q->prp));
    if (!q->trk || !q->prp) {
        idma_qpair_free(q);
        return NULL;
    }
    q->sq = sq;
    q->cq = cq;
    q->sq_db = (volatile uint32_t *)(bar0 + idma_sq_doorbell_offset(qid, dstrd));
    q->cq_db = (volatile uint32_t *)(bar0 + idma_cq_doorbell_offset(qid, dstrd));
    q->depth = depth;
    q->ntrk = ntrk;
    q->page_size = page_size;
    q->list_slots = pages_each * (page_size / sizeof(uint64_t));
    q->qid = qid;
    q->phase = 1;                       /* §4.6: the controller posts phase 1 on the first lap */
    q->bad_index = -1;
    q->maptable = maptable;
    init_trackers(q, list_area, pages_each);
    return q;
}

void idma_qpair_free(struct idma_qpair *q)
{
    if (q) {
        free(q->trk);
        free(q->prp);
        free(q);
    }
}

/* Check the buffer and build its PRPs into the tracker's list (§4.1.1). */
static int prepare(const struct idma_qpair *q, const struct tracker *t,
                   const struct idma_io *io, uint64_t *prp1, uint64_t *prp2)
{
    int rc;

    if (io->len == 0)
        return IDMA_OK;
    if (q->maptable && !idma_maptable_contains(q->maptable, io->buf, io->len))
        return IDMA_EUNMAPPED;
    rc = idma_prp_build(io->buf, io->len, q->page_size, t->list, (uint64_t)(uintptr_t)t->list,
                        t->list ? q->list_slots : 0, prp1, prp2);
    if (rc == -1)
        return IDMA_EALIGN;
    if (rc == -3)
        return IDMA_ETOOBIG;
    return rc < 0 ? IDMA_EINVAL : IDMA_OK;
}

/* Copy one prepared command into the SQ ring with its CID (§4.2: CDW0 bits 31:16). */
static void place(struct idma_qpair *q, const struct idma_sqe *cmd, uint16_t cid,
                  const struct idma_io *io, uint64_t prp1, uint64_t prp2)
{
    struct idma_sqe *slot = &q->sq[q->sq_tail];

    *slot = *cmd;
    slot->cdw0 = (cmd->cdw0 & 0xFFFFu) | ((uint32_t)cid << 16);
    if (io->len) {
        slot->prp1 = prp1;
        slot->prp2 = prp2;
    }
    q->sq_tail = q->sq_tail + 1 == q->depth ? 0 : q->sq_tail + 1;
}

static void take_tracker(struct idma_qpair *q, uint16_t id, uint64_t tag)
{
    struct tracker *t = &q->trk[id];

    q->free_head = t->next_free;
    t->busy = 1;
    t->tag = tag;
    q->nfree--;
}

int idma_qpair_submit(struct idma_qpair *q, const struct idma_sqe *cmds,
                      const struct idma_io *io, uint32_t n)
{
    uint32_t fit = n < q->nfree ? n : q->nfree, i;
    uint16_t id = q->free_head;

    q->bad_index = -1;
    if (n && (!cmds || !io))
        return IDMA_EINVAL;
    /* Validate every command that fits before any of them reaches the ring. */
    for (i = 0; i < fit; i++, id = q->trk[id].next_free) {
        int rc = prepare(q, &q->trk[id], &io[i], &q->prp[2 * i], &q->prp[2 * i + 1]);
        if (rc < 0) {
            q->bad_index = (int)i;
            return rc;
        }
    }
    for (i = 0; i < fit; i++) {
        uint16_t cid = q->free_head;        /* CID = tracker index */
        take_tracker(q, cid, io[i].tag);
        place(q, &cmds[i], cid, &io[i], q->prp[2 * i], q->prp[2 * i + 1]);
    }
    if (fit) {
        idma_wmb();                         /* SQEs visible before the tail doorbell */
        *q->sq_db = q->sq_tail;             /* §3.3.1: one SQ tail doorbell per batch */
        q->sq_dbs++;
        q->submitted += fit;
    }
    return (int)fit;
}

int idma_qpair_bad_index(const struct idma_qpair *q)
{
    return q->bad_index;
}

/* Consume the CQE at the head if its phase tag is current (§4.6). 1 = reaped into out. */
static int reap_one(struct idma_qpair *q, struct idma_cpl *out)
{
    volatile struct idma_cqe *e = &q->cq[q->cq_head];
    uint16_t st = e->status;
    uint16_t cid;
    struct tracker *t;

    if ((st & 1) != q->phase)
        return -1;                      /* not yet written by the controller */
    idma_rmb();                         /* read DW3 first, then the rest */
    cid = e->cid;
    q->sq_head = e->sq_head;            /* §4.6: SQ head pointer, frees SQ slots */
    out->result = e->dw0;
    if (++q->cq_head == q->depth) {     /* phase flips at each wrap */
        q->cq_head = 0;
        q->phase ^= 1;
    }
    t = cid < q->ntrk ? &q->trk[cid] : NULL;
    if (!t || !t->busy) {
        q->spurious++;
        return 0;
    }
    out->tag = t->tag;
    out->cid = cid;
    out->status = st >> 1;
    t->busy = 0;
    t->next_free = q->free_head;
    q->free_head = cid;
    q->nfree++;
    q->completed++;
    return 1;
}

int idma_qpair_poll(struct idma_qpair *q, struct idma_cpl *out, uint32_t max)
{
    uint32_t n = 0;
    int moved = 0, rc;

    while (n < max && (rc = reap_one(q, &out[n])) >= 0) {
        n += (uint32_t)rc;
        moved = 1;
    }
    if (moved) {
        *q->cq_db = q->cq_head;         /* one CQ head doorbell per poll call */
        q->cq_dbs++;
    }
    return (int)n;
}

int idma_qpair_wait(struct idma_qpair *q, struct idma_cpl *out, uint32_t max, uint32_t min,
                    uint64_t timeout_ns)
{
    uint32_t inflight = q->ntrk - q->nfree, spins = 0;
    uint32_t n = (uint32_t)idma_qpair_poll(q, out, max);
    uint64_t now, deadline;

    if (min > max)
        min = max;
    if (min > inflight)
        min = inflight;
    if (n >= min)
        return (int)n;
    now = idma_now_ns();
    deadline = now + timeout_ns < now ? UINT64_MAX : now + timeout_ns;
    while (n < min) {
        idma_pause();
        n += (uint32_t)idma_qpair_poll(q, out + n, max - n);
        if ((++spins & 63) == 0 && idma_now_ns() >= deadline)   /* clock every 64 polls */
            break;
    }
    return (int)n;
}

uint32_t idma_qpair_inflight(const struct idma_qpair *q)
{
    return q->ntrk - q->nfree;
}

void idma_qpair_get_info(const struct idma_qpair *q, struct idma_qpair_info *out)
{
    memset(out, 0, sizeof(*out));
    out->qid = q->qid;
    out->phase = q->phase;
    out->depth = q->depth;
    out->trackers = q->ntrk;
    out->free = q->nfree;
    out->sq_tail = q->sq_tail;
    out->sq_head = q->sq_head;
    out->cq_head = q->cq_head;
    out->list_slots = q->list_slots;
    out->submitted = q->submitted;
    out->completed = q->completed;
    out->spurious = q->spurious;
    out->sq_doorbells = q->sq_dbs;
    out->cq_doorbells = q->cq_dbs;
}
