/* NVMe I/O queue pair engine: trackers, PRPs, SQ tail / CQ head doorbells, phase tags. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "engine.h"
#include "queue.h"

/*
 * Doorbell writes (§3.1.3). The engine built with IDMA_SIM_DEVICE (native/build.py --sim, for
 * the deterministic engine-cost figure and its tests) hands them to the simulated controller
 * of native/sim/; every other build stores to BAR0 directly.
 */
#ifdef IDMA_SIM_DEVICE
#include "sim/sim_device.h"
#define idma_db_write(db, v) idma_sim_doorbell((db), (v))
#else
#define idma_db_write(db, v) (*(db) = (v))
#endif

_Static_assert(sizeof(struct idma_sqe) == 64, "SQE is 64 bytes (NVMe 2.0 §4.2)");
_Static_assert(sizeof(struct idma_cqe) == 16, "CQE is 16 bytes (NVMe 2.0 §4.6)");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "NVMe structures are little endian "
               "(§1.5): the SQE/CQE layouts and poll_into's dword reads assume a little-endian host");

/*
 * Barriers between DMA memory and MMIO. wmb: SQ entries are globally visible before the
 * doorbell write. rmb: the rest of a CQE is read only after its phase tag was seen.
 */
#if defined(__x86_64__) || defined(__i386__)
#define idma_wmb() __asm__ __volatile__("sfence" ::: "memory")
#define idma_mb() __asm__ __volatile__("mfence" ::: "memory")
#define idma_rmb() __asm__ __volatile__("" ::: "memory")    /* x86: loads are not reordered */
#elif defined(__aarch64__)
#define idma_wmb() __asm__ __volatile__("dsb st" ::: "memory")
#define idma_rmb() __asm__ __volatile__("dsb ld" ::: "memory")
#define idma_mb() __asm__ __volatile__("dsb sy" ::: "memory")
#else
#define idma_wmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define idma_rmb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define idma_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#endif

struct tracker {
    uint64_t tag;
    uint64_t *list;             /* this tracker's PRP list pages (IOVA = address) */
    uint16_t next_free;
    uint8_t busy;
    uint8_t gen;                /* CID 15:12, bumped each time the tracker is freed */
};

#define CID_INDEX_MASK ((1u << IDMA_CID_INDEX_BITS) - 1)
#define CID_GEN_MASK 0xFu

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
    struct idma_maptable *maptable; /* one reference held */
    uint32_t dstrd;
    /* shadow doorbells (§5.8): NULL when not in use */
    volatile uint32_t *sq_shadow, *cq_shadow, *sq_ei, *cq_ei;
    uint8_t mmio_always;            /* shadow + BAR0 on every doorbell (admin queue) */
    uint8_t sgl;                    /* data pointers: 1 = one SGL descriptor, 0 = PRPs */
    struct idma_mapcache mcache;    /* the mapping that covered the last checked buffer */
    const uint32_t *map_gen;        /* the maptable's generation word (NULL: no maptable) */
    uint8_t sq_force;               /* next SQ doorbell goes to BAR0 whatever the EventIdx */
    uint32_t sq_db_tail;            /* SQ tail value of the last doorbell update */
    uint32_t cq_db_head;            /* CQ head value of the last doorbell update */
    uint32_t cq_mmio_head;          /* CQ head value the controller last got by MMIO */
    uint32_t cq_batch;              /* defer CQ head MMIO up to this many entries */
    uint64_t submitted, completed, spurious, sq_dbs, cq_dbs, sq_mmio, cq_mmio;
    uint32_t in_use;                /* single-owner flag, taken by compare-and-swap */
    uint32_t dead;                  /* set by idma_qpair_quiesce: no call may enter */
};

#define NO_TRACKER 0xFFFF

uint64_t idma_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Fast clock for the polling loops. In a TCG guest the kernel often runs on the HPET
 * clocksource: every clock_gettime is then a system call and an emulated MMIO read, which
 * takes QEMU's global lock the device emulation needs. The TSC is read without any exit,
 * so it is calibrated once against CLOCK_MONOTONIC and used instead where available.
 */
#if defined(__x86_64__)
static uint64_t tsc_base, ns_base, tsc_mult;    /* ns = ns_base + (tsc - tsc_base) * mult >> 32 */
static int tsc_ok;                              /* written once, under tsc_once */
static int tsc_ready;                           /* set (release) when calibrate_tsc is done */
static pthread_once_t tsc_once = PTHREAD_ONCE_INIT;

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;

    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

/* Run once (pthread_once): every thread sees the same base and multiplier afterwards. */
static void calibrate_tsc(void)
{
    uint64_t t0 = idma_now_ns(), c0 = rdtsc(), t1, c1, mult;

    do {
        t1 = idma_now_ns();
    } while (t1 - t0 < 5000000);                /* 5 ms */
    c1 = rdtsc();
    mult = c1 > c0 ? (uint64_t)(((unsigned __int128)(t1 - t0) << 32) / (c1 - c0)) : 0;
    if (mult >= (1ull << 32) / 20 && mult <= (1ull << 32) * 10) {  /* a 0.1-20 GHz counter */
        tsc_base = c1;
        ns_base = t1;
        tsc_mult = mult;
        tsc_ok = 1;
    }                                           /* else: do not trust it, use the clock */
    __atomic_store_n(&tsc_ready, 1, __ATOMIC_RELEASE);
}

uint64_t idma_fast_ns(void)
{
    /* tsc_ready (acquire) set: calibrate_tsc ran to its end, its results are visible, and
     * the pthread_once call (a library call on every clock read) can be skipped. */
    if (!__atomic_load_n(&tsc_ready, __ATOMIC_ACQUIRE))
        pthread_once(&tsc_once, calibrate_tsc);
    if (!tsc_ok)
        return idma_now_ns();
    return ns_base + (uint64_t)(((unsigned __int128)(rdtsc() - tsc_base) * tsc_mult) >> 32);
}
#else
uint64_t idma_fast_ns(void)
{
    return idma_now_ns();
}
#endif

uint64_t idma_sq_doorbell_offset(uint16_t qid, uint32_t dstrd)
{
    return 0x1000 + (2ull * qid) * (4ull << (dstrd & 31));      /* §3.1.3: SQyTDBL */
}

uint64_t idma_cq_doorbell_offset(uint16_t qid, uint32_t dstrd)
{
    return 0x1000 + (2ull * qid + 1) * (4ull << (dstrd & 31));  /* §3.1.3: CQyHDBL */
}

static int valid_args(uint16_t qid, uint32_t depth, void *sq, void *cq,
                      volatile uint8_t *bar0, uint64_t bar0_size, uint32_t dstrd,
                      uint32_t page_size)
{
    uint64_t mask = (uint64_t)page_size - 1;

    if (depth < 2 || depth > IDMA_MAX_DEPTH || !sq || !cq || !bar0 || dstrd > 15)
        return 0;
    /* §3.1.3: both doorbells of this queue must be inside the mapped BAR0 */
    if (idma_sq_doorbell_offset(qid, dstrd) + 4 > bar0_size ||
        idma_cq_doorbell_offset(qid, dstrd) + 4 > bar0_size)
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
                                  volatile uint8_t *bar0, uint64_t bar0_size, uint32_t dstrd,
                                  uint32_t page_size, void *list_area, uint32_t list_pages,
                                  struct idma_maptable *maptable)
{
    struct idma_qpair *q;
    uint32_t ntrk = depth - 1, pages_each;

    if (!valid_args(qid, depth, sq, cq, bar0, bar0_size, dstrd, page_size))
        return NULL;
    if (list_area && ((uintptr_t)list_area & (page_size - 1)))
        return NULL;
    pages_each = list_area ? list_pages / ntrk : 0;
    if (list_area && pages_each == 0)                   /* at least one list page each */
        return NULL;
    if ((uint64_t)pages_each * (page_size / sizeof(uint64_t)) > INT32_MAX)
        return NULL;                                    /* list slots must fit an int */
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
    q->maptable = idma_maptable_ref(maptable);
    q->map_gen = maptable ? idma_maptable_gen(maptable) : NULL;
    q->dstrd = dstrd;
    init_trackers(q, list_area, pages_each);
    return q;
}

void idma_qpair_free(struct idma_qpair *q)
{
    if (q) {
        idma_maptable_free(q->maptable);    /* drops this queue's reference */
        free(q->trk);
        free(q->prp);
        free(q);
    }
}

static inline int mapped(struct idma_qpair *q, uint64_t addr, uint64_t len)
{
    uint64_t end = addr + len;

    if (len && end > addr && idma_mapcache_hit(&q->mcache, q->map_gen, addr, end))
        return 1;
    return idma_maptable_contains_cached(q->maptable, addr, len, &q->mcache);
}

/* PRPs of a buffer that crosses a page: built into the tracker's list (§4.1.1). */
static __attribute__((noinline)) int prepare_list(struct idma_qpair *q, const struct tracker *t,
                                                  const struct idma_io *io, uint64_t *prp1,
                                                  uint64_t *prp2)
{
    int rc = idma_prp_build(io->buf, io->len, q->page_size, t->list,
                            (uint64_t)(uintptr_t)t->list, t->list ? q->list_slots : 0, prp1,
                            prp2);

    if (rc == -1)
        return IDMA_EALIGN;
    if (rc == -3)
        return IDMA_ETOOBIG;
    return rc < 0 ? IDMA_EINVAL : IDMA_OK;
}

/* Check the buffer and give its PRPs or SGL descriptor (§4.1.1, §4.1.2); inline for the
 * common case of a transfer within one page. */
static inline __attribute__((always_inline)) int prepare(struct idma_qpair *q,
                                                         const struct tracker *t,
                                                         const struct idma_io *io,
                                                         uint64_t *prp1, uint64_t *prp2)
{
    *prp1 = *prp2 = 0;                      /* no data: the device gets no pointer */
    if (io->mlen) {
        if (io->mbuf & 3)
            return IDMA_EALIGN;             /* MPTR: dword aligned (§4.2, Figure 88) */
        if (q->maptable && !mapped(q, io->mbuf, io->mlen))
            return IDMA_EUNMAPPED;
    }
    if (io->len == 0)
        return IDMA_OK;
    if (q->maptable && !mapped(q, io->buf, io->len))
        return IDMA_EUNMAPPED;
    if (q->sgl) {
        /* One SGL Data Block descriptor (§4.1.2.1): address in bytes 7:0, length in 11:8,
         * identifier byte 15 = 0 (Data Block, Address subtype). */
        if (io->buf & 3)
            return IDMA_EALIGN;
        if (io->len > UINT32_MAX || io->buf + io->len < io->buf)
            return IDMA_ETOOBIG;
        *prp1 = io->buf;
        *prp2 = io->len;
        return IDMA_OK;
    }
    /* Within one page (a 4 KiB read): PRP1 only, PRP2 stays 0, exactly what idma_prp_build
     * returns for it (same alignment and wrap checks), without the call. */
    if (!(io->buf & 3) && io->len <= q->page_size - (io->buf & (q->page_size - 1)) &&
        io->buf + io->len > io->buf) {
        *prp1 = io->buf;
        return IDMA_OK;
    }
    return prepare_list(q, t, io, prp1, prp2);
}

/* Ring distance from a to b (b - a mod depth); positions are < depth. */
static inline uint32_t ring_dist(const struct idma_qpair *q, uint32_t a, uint32_t b)
{
    return b >= a ? b - a : b + q->depth - a;
}

/*
 * EventIdx rule for shadow doorbells (§5.8; the virtio/Linux "need event" test, done modulo
 * the ring size): the controller wants an MMIO write when the update from old to new moved
 * past its EventIdx, i.e. ei lies in [old, new) going round the ring.
 */
static inline int need_event(const struct idma_qpair *q, uint32_t ei, uint32_t nw, uint32_t old)
{
    if (ei >= q->depth)
        return 1;                       /* not a ring position: be safe */
    return ring_dist(q, ei, nw) - 1 < ring_dist(q, old, nw);
}

/* Announce the CQ head (§3.3.1.2): shadow dword, then BAR0 when needed. force: BAR0 always. */
static void ring_cq(struct idma_qpair *q, int force)
{
    uint32_t head = q->cq_head, old = q->cq_db_head;
    int mmio = 1;

    if (q->cq_shadow) {
        *q->cq_shadow = head;
        idma_mb();                      /* shadow store before the EventIdx load */
        mmio = q->mmio_always || force || (q->cq_batch <= 1 && need_event(q, *q->cq_ei, head, old));
    } else if (q->cq_batch > 1 && !force) {
        mmio = ring_dist(q, q->cq_mmio_head, head) >= q->cq_batch;
    }
    if (mmio) {
        idma_db_write(q->cq_db, head);
        q->cq_mmio_head = head;
        q->cq_mmio++;
    }
    q->cq_db_head = head;
    q->cq_dbs++;
}

/* Announce the SQ tail (§3.3.1.1), shadow first when in use. SQEs are visible before either. */
static void ring_sq(struct idma_qpair *q)
{
    uint32_t tail = q->sq_tail, old = q->sq_db_tail;
    int mmio = 1;

    /* Deferred CQ head: the controller must see room for every command in flight. */
    if (q->cq_batch > 1 && ring_dist(q, q->cq_mmio_head, q->cq_head) + (q->ntrk - q->nfree)
                               > q->ntrk && !q->cq_shadow)
        ring_cq(q, 1);
    idma_wmb();                         /* SQEs visible before the tail update */
    if (q->sq_shadow) {
        *q->sq_shadow = tail;
        idma_mb();                      /* shadow store before the EventIdx load */
        mmio = q->mmio_always || q->sq_force || need_event(q, *q->sq_ei, tail, old);
    }
    if (mmio) {
        idma_db_write(q->sq_db, tail); /* §3.3.1: one SQ tail doorbell per batch */
        q->sq_force = 0;
        q->sq_mmio++;
    }
    q->sq_db_tail = tail;
    q->sq_dbs++;
}

int idma_qpair_set_shadow(struct idma_qpair *q, uint32_t *shadow_db, uint32_t *eventidx,
                          int mmio_always)
{
    uint64_t sq_off, cq_off;
    int rc;

    if (!q)
        return IDMA_EINVAL;
    sq_off = idma_sq_doorbell_offset(q->qid, q->dstrd) - 0x1000;
    cq_off = idma_cq_doorbell_offset(q->qid, q->dstrd) - 0x1000;

    if (!shadow_db != !eventidx || cq_off + 4 > q->page_size)
        return IDMA_EINVAL;
    if (((uintptr_t)shadow_db | (uintptr_t)eventidx) & (q->page_size - 1))
        return IDMA_EINVAL;             /* §5.8: PRP1/PRP2 are page aligned */
    if ((rc = idma_qpair_claim(q)) != 0)
        return rc;
    if (!shadow_db) {
        q->sq_shadow = q->cq_shadow = q->sq_ei = q->cq_ei = NULL;
        q->cq_mmio_head = q->cq_db_head;
        idma_db_write(q->cq_db, q->cq_db_head);  /* BAR0 is authoritative again */
        idma_qpair_release(q);
        return IDMA_OK;
    }
    q->sq_shadow = (volatile uint32_t *)((uint8_t *)shadow_db + sq_off);
    q->cq_shadow = (volatile uint32_t *)((uint8_t *)shadow_db + cq_off);
    q->sq_ei = (volatile uint32_t *)((uint8_t *)eventidx + sq_off);
    q->cq_ei = (volatile uint32_t *)((uint8_t *)eventidx + cq_off);
    *q->sq_shadow = q->sq_db_tail;      /* the values the controller already has */
    *q->cq_shadow = q->cq_db_head;
    q->mmio_always = mmio_always != 0;
    q->sq_force = 1;
    idma_mb();
    idma_qpair_release(q);
    return IDMA_OK;
}

void idma_qpair_set_cq_batch(struct idma_qpair *q, uint32_t batch)
{
    if (!q)
        return;
    if (batch <= 1 && q->cq_mmio_head != q->cq_db_head)
        ring_cq(q, 1);                  /* nothing stays unannounced */
    q->cq_batch = batch > q->ntrk ? q->ntrk : batch;
}

/* Copy one prepared command into the SQ ring with its CID (§4.2: CDW0 bits 31:16). */
static inline __attribute__((always_inline)) void place(struct idma_qpair *q,
                                                       const struct idma_sqe *cmd, uint16_t cid,
                                                       const struct idma_io *io, uint64_t prp1,
                                                       uint64_t prp2)
{
    struct idma_sqe *slot = &q->sq[q->sq_tail];

    *slot = *cmd;
    if (!io) {                              /* unchecked: the caller's pointers as given */
        slot->cdw0 = (cmd->cdw0 & 0xFFFFu) | ((uint32_t)cid << 16);
    } else {
        /* The only pointers the device gets are built from the checked buffers: PSDT (CDW0
         * 15:14) 00b PRPs or 01b one SGL descriptor; MPTR the checked metadata or 0 (§4.2). */
        uint32_t psdt = q->sgl && io->len ? 1u << 14 : 0;

        slot->cdw0 = (cmd->cdw0 & 0x3FFFu) | psdt | ((uint32_t)cid << 16);
        slot->mptr = io->mlen ? io->mbuf : 0;
        slot->prp1 = prp1;
        slot->prp2 = prp2;
    }
    q->sq_tail = q->sq_tail + 1 == q->depth ? 0 : q->sq_tail + 1;
}

/* Take the tracker at the head of the free list; its CID is generation << 12 | index. */
static uint16_t take_tracker(struct idma_qpair *q, uint64_t tag)
{
    uint16_t id = q->free_head;
    struct tracker *t = &q->trk[id];

    q->free_head = t->next_free;
    t->busy = 1;
    t->tag = tag;
    q->nfree--;
    return (uint16_t)((uint32_t)t->gen << IDMA_CID_INDEX_BITS | id);
}

int idma_qpair_claim(struct idma_qpair *q)
{
    uint32_t idle = 0;

    if (!q)
        return IDMA_EINVAL;
    if (__atomic_load_n(&q->dead, __ATOMIC_ACQUIRE))
        return IDMA_ECLOSED;
    if (__atomic_compare_exchange_n(&q->in_use, &idle, 1, 0, __ATOMIC_ACQUIRE,
                                    __ATOMIC_RELAXED))
        return IDMA_OK;
    return __atomic_load_n(&q->dead, __ATOMIC_ACQUIRE) ? IDMA_ECLOSED : IDMA_EBUSY;
}

int idma_qpair_dead(const struct idma_qpair *q)
{
    return (int)__atomic_load_n(&q->dead, __ATOMIC_RELAXED);
}

void idma_qpair_quiesce(struct idma_qpair *q)
{
    uint32_t idle;

    if (!q)
        return;
    __atomic_store_n(&q->dead, 1, __ATOMIC_RELEASE);
    for (;;) {
        idle = 0;
        if (__atomic_compare_exchange_n(&q->in_use, &idle, 1, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;                     /* in_use stays taken: nothing enters again */
        struct timespec ts = { 0, 50000 };
        nanosleep(&ts, NULL);
    }
}

void idma_qpair_release(struct idma_qpair *q)
{
    __atomic_store_n(&q->in_use, 0, __ATOMIC_RELEASE);
}

int idma_qpair_submit_claimed(struct idma_qpair *q, const struct idma_sqe *cmds,
                              const struct idma_io *io, uint32_t n)
{
    uint32_t fit = n < q->nfree ? n : q->nfree, i;     /* fit <= trackers: scratch bound */
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
        uint16_t cid = take_tracker(q, io[i].tag);
        place(q, &cmds[i], cid, &io[i], q->prp[2 * i], q->prp[2 * i + 1]);
    }
    if (fit) {
        q->submitted += fit;
        ring_sq(q);
    }
    return (int)fit;
}

int idma_qpair_submit(struct idma_qpair *q, const struct idma_sqe *cmds,
                      const struct idma_io *io, uint32_t n)
{
    int rc;

    if ((rc = idma_qpair_claim(q)) != 0)
        return rc;
    rc = idma_qpair_submit_claimed(q, cmds, io, n);
    idma_qpair_release(q);
    return rc;
}

int idma_qpair_submit_unchecked(struct idma_qpair *q, const struct idma_sqe *cmds,
                                const uint64_t *tags, uint32_t n)
{
    uint32_t fit, i;
    int rc;

    if (n && (!cmds || !tags))
        return IDMA_EINVAL;
    if ((rc = idma_qpair_claim(q)) != 0)
        return rc;
    fit = n < q->nfree ? n : q->nfree;
    for (i = 0; i < fit; i++)
        place(q, &cmds[i], take_tracker(q, tags[i]), NULL, 0, 0);
    if (fit) {
        q->submitted += fit;
        ring_sq(q);
    }
    idma_qpair_release(q);
    return (int)fit;
}

int idma_qpair_set_sgl(struct idma_qpair *q, uint32_t sgl)
{
    int rc;

    if (!q || sgl > 1 || q->qid == 0)
        return IDMA_EINVAL;
    if ((rc = idma_qpair_claim(q)) != 0)
        return rc;
    q->sgl = (uint8_t)sgl;
    idma_qpair_release(q);
    return IDMA_OK;
}

int idma_qpair_bad_index(const struct idma_qpair *q)
{
    return q ? q->bad_index : -1;
}

/*
 * Whether every buffer of a submit_rw call (buf_base + tag * stride, len bytes, tag <= top)
 * needs only PRP1 (§4.1.1: dword aligned, within one memory page) and lies in one mapped
 * range, checked once for the area [buf_base, buf_base + top * stride + len) instead of once
 * per command. Same page offset for every buffer: stride is a non-zero multiple of the page
 * size.
 * 0: check each buffer (prepare), which also names the first bad one.
 */
static int rw_area_ok(struct idma_qpair *q, uint64_t len, uint64_t top, uint64_t buf_base,
                      uint64_t stride)
{
    uint64_t span, end;

    if (q->sgl || !stride || (buf_base & 3) || stride & (q->page_size - 1) ||
        len > q->page_size - (buf_base & (q->page_size - 1)))
        return 0;
    if (__builtin_mul_overflow(top, stride, &span) || __builtin_add_overflow(span, len, &span) ||
        __builtin_add_overflow(buf_base, span, &end))
        return 0;
    return !q->maptable || mapped(q, buf_base, span);
}

/*
 * The SQEs of submit_rw: tmpl with each command's CID, SLBA (CDW10-11) and data pointer, on the
 * trackers take_tracker would give, in order. buf_stride 0: the pointers prepare_rw left in
 * q->prp; else PRP1 = buf_base + tag * buf_stride (rw_area_ok), PRP2 0. Queue fields are
 * kept in locals: the stores into the ring cannot alias them for the compiler.
 */
static void place_rw(struct idma_qpair *q, const struct idma_sqe *tmpl, const uint64_t *lbas,
                     const uint64_t *tags, uint32_t fit, uint64_t buf_base, uint64_t buf_stride)
{
    struct idma_sqe *sq = q->sq;
    struct tracker *trk = q->trk;
    const uint64_t *prp = q->prp;
    uint32_t tail = q->sq_tail, depth = q->depth;
    uint16_t id = q->free_head;

    for (uint32_t i = 0; i < fit; i++) {
        struct tracker *t = &trk[id];
        struct idma_sqe *slot = &sq[tail];
        uint16_t cid = (uint16_t)((uint32_t)t->gen << IDMA_CID_INDEX_BITS | id);

        t->busy = 1;
        t->tag = tags[i];
        *slot = *tmpl;
        slot->cdw0 = tmpl->cdw0 | (uint32_t)cid << 16;
        slot->cdw10 = (uint32_t)lbas[i];
        slot->cdw11 = (uint32_t)(lbas[i] >> 32);
        if (buf_stride) {
            slot->prp1 = buf_base + tags[i] * buf_stride;
            slot->prp2 = 0;
        } else {
            slot->prp1 = prp[2 * i];
            slot->prp2 = prp[2 * i + 1];
        }
        tail = tail + 1 == depth ? 0 : tail + 1;
        id = t->next_free;
    }
    q->sq_tail = tail;
    q->free_head = id;
    q->nfree -= fit;
}

/* Check the buffers of submit_rw's first fit commands one by one into q->prp (§4.1.1). */
static int prepare_rw(struct idma_qpair *q, uint64_t len, const uint64_t *tags, uint32_t fit,
                      uint64_t buf_base, uint64_t buf_stride)
{
    uint16_t id = q->free_head;

    for (uint32_t i = 0; i < fit; i++, id = q->trk[id].next_free) {
        struct idma_io io = { .buf = buf_base + tags[i] * buf_stride, .len = len,
                              .tag = tags[i] };
        int rc = prepare(q, &q->trk[id], &io, &q->prp[2 * i], &q->prp[2 * i + 1]);
        if (rc < 0) {
            q->bad_index = (int)i;
            return rc;
        }
    }
    return IDMA_OK;
}

static int submit_rw(struct idma_qpair *q, uint8_t opcode, uint32_t nsid, uint32_t nlb,
                     uint32_t lba_size, const uint64_t *lbas, const uint64_t *tags,
                     uint32_t n, uint64_t buf_base, uint64_t buf_stride)
{
    uint32_t fit = n < q->nfree ? n : q->nfree, i;     /* fit <= trackers: scratch bound */
    uint64_t len = (uint64_t)nlb * lba_size, top = 0;
    struct idma_sqe cmd;
    int area, rc;

    q->bad_index = -1;
    if (n && (!lbas || !tags || nlb == 0 || nlb > 65536 || !lba_size))
        return IDMA_EINVAL;
    for (i = 0; i + 1 < fit; i += 2) {             /* two at a time: half the loop steps */
        uint64_t m = tags[i] > tags[i + 1] ? tags[i] : tags[i + 1];
        top = m > top ? m : top;
    }
    if (i < fit)
        top = tags[i] > top ? tags[i] : top;
    area = fit && rw_area_ok(q, len, top, buf_base, buf_stride);
    if (!area && (rc = prepare_rw(q, len, tags, fit, buf_base, buf_stride)) < 0)
        return rc;
    memset(&cmd, 0, sizeof(cmd));
    cmd.cdw0 = opcode | (q->sgl ? 1u << 14 : 0);    /* PSDT as place() sets it */
    cmd.nsid = nsid;
    cmd.cdw12 = nlb - 1;                /* NVM Command Set 1.0 §3.3.4: 0's based NLB */
    place_rw(q, &cmd, lbas, tags, fit, area ? buf_base : 0, area ? buf_stride : 0);
    if (fit) {
        q->submitted += fit;
        ring_sq(q);
    }
    return (int)fit;
}

int idma_qpair_submit_rw_claimed(struct idma_qpair *q, uint8_t opcode, uint32_t nsid,
                                 uint32_t nlb, uint32_t lba_size, const uint64_t *lbas,
                                 const uint64_t *tags, uint32_t n, uint64_t buf_base,
                                 uint64_t buf_stride)
{
    return submit_rw(q, opcode, nsid, nlb, lba_size, lbas, tags, n, buf_base, buf_stride);
}

int idma_qpair_submit_rw(struct idma_qpair *q, uint8_t opcode, uint32_t nsid, uint32_t nlb,
                         uint32_t lba_size, const uint64_t *lbas, const uint64_t *tags,
                         uint32_t n, uint64_t buf_base, uint64_t buf_stride)
{
    int rc;

    if ((rc = idma_qpair_claim(q)) != 0)
        return rc;
    rc = submit_rw(q, opcode, nsid, nlb, lba_size, lbas, tags, n, buf_base, buf_stride);
    idma_qpair_release(q);
    return rc;
}

/*
 * The tracker a CQE names (DW3 15:0 CID, DW2 15:0 SQ head, 31:16 SQ id), or NULL when the CQE
 * must be dropped (§4.6): CID of a free tracker or of an earlier generation (late or
 * duplicate), SQ head not a ring position, or an SQ identifier other than this queue's. The
 * queue's fields come as arguments, so callers keep them in registers.
 */
static inline struct tracker *cqe_tracker(struct tracker *trk, uint32_t ntrk, uint32_t depth,
                                          uint16_t qid, uint32_t dw3, uint32_t dw2)
{
    uint32_t id = dw3 & CID_INDEX_MASK;
    struct tracker *t;

    if (id >= ntrk || (dw2 & 0xFFFF) >= depth || dw2 >> 16 != qid)
        return NULL;
    t = &trk[id];
    if (!t->busy || t->gen != ((dw3 & 0xFFFF) >> IDMA_CID_INDEX_BITS))
        return NULL;
    return t;
}

/*
 * Reap up to max CQEs into either out[] or tags[]/status[]; one CQ head update if any. At most
 * depth CQEs are consumed per call, so a device flooding the CQ cannot hold the caller forever.
 * A CQE is read as two dwords: DW3 (phase tag, status, CID) first, then after the read barrier
 * DW2 (SQ head and identifier) and DW0 (§4.6). Each reaped tracker goes back to the free list
 * with its next generation. The queue's fields are kept in locals, which the stores into the
 * outputs and the trackers cannot alias for the compiler.
 */
static uint32_t poll_into(struct idma_qpair *q, struct idma_cpl *out, uint64_t *tags,
                          uint16_t *status, uint32_t max)
{
    volatile struct idma_cqe *cq = q->cq;
    struct tracker *trk = q->trk;
    uint32_t n = 0, seen = 0, head = q->cq_head, depth = q->depth;
    uint32_t phase = (uint32_t)q->phase << 16, ntrk = q->ntrk, sq_head = q->sq_head;
    uint16_t qid = q->qid, free_head = q->free_head;

    while (n < max && seen < depth) {
        const volatile uint32_t *e = (const volatile uint32_t *)&cq[head];
        uint32_t dw3 = e[3], dw2, dw0;
        struct tracker *t;

        if ((dw3 & 1u << 16) != phase)
            break;                      /* not yet written by the controller */
        idma_rmb();
        dw2 = e[2];
        dw0 = e[0];
        if (++head == depth) {          /* phase flips at each wrap */
            head = 0;
            phase ^= 1u << 16;
        }
        seen++;
        if (!(t = cqe_tracker(trk, ntrk, depth, qid, dw3, dw2))) {
            q->spurious++;
            continue;
        }
        sq_head = dw2 & 0xFFFF;         /* §4.6: SQ head pointer, frees SQ slots */
        if (out) {
            out[n].tag = t->tag;
            out[n].result = dw0;
            out[n].cid = (uint16_t)dw3;
            out[n].status = (uint16_t)(dw3 >> 17);
        } else {
            tags[n] = t->tag;
            status[n] = (uint16_t)(dw3 >> 17);
        }
        t->busy = 0;
        t->gen = (uint8_t)((t->gen + 1) & CID_GEN_MASK);
        t->next_free = free_head;
        free_head = (uint16_t)(t - trk);
        n++;
    }
    q->cq_head = head;
    q->phase = (uint16_t)(phase >> 16);
    q->sq_head = sq_head;
    q->free_head = free_head;
    q->nfree += n;
    q->completed += n;
    if (seen)
        ring_cq(q, 0);                  /* one CQ head update per poll call */
    return n;
}

int idma_qpair_poll_claimed(struct idma_qpair *q, struct idma_cpl *out, uint32_t max)
{
    if (max && !out)
        return IDMA_EINVAL;
    return (int)poll_into(q, out, NULL, NULL, max);
}

int idma_qpair_poll(struct idma_qpair *q, struct idma_cpl *out, uint32_t max)
{
    int n;

    if (max && !out)
        return IDMA_EINVAL;
    if ((n = idma_qpair_claim(q)) != 0)
        return n;
    n = (int)poll_into(q, out, NULL, NULL, max);
    idma_qpair_release(q);
    return n;
}

/* Poll until min completions (capped at max and at the commands in flight) or the timeout. */
static uint32_t wait_into(struct idma_qpair *q, struct idma_cpl *out, uint64_t *tags,
                          uint16_t *status, uint32_t max, uint32_t min, uint64_t timeout_ns)
{
    uint32_t inflight = q->ntrk - q->nfree, spins = 0;
    uint32_t n = poll_into(q, out, tags, status, max);
    uint64_t now, deadline;

    if (min > max)
        min = max;
    if (min > inflight)
        min = inflight;
    if (n >= min)
        return n;
    now = idma_fast_ns();
    deadline = now + timeout_ns < now ? UINT64_MAX : now + timeout_ns;
    while (n < min) {
        n += poll_into(q, out ? out + n : NULL, tags ? tags + n : NULL,
                       status ? status + n : NULL, max - n);
        if ((++spins & 63) == 0 && idma_fast_ns() >= deadline)  /* clock every 64 polls */
            break;
    }
    return n;
}

int idma_qpair_wait_tags(struct idma_qpair *q, uint64_t *tags, uint16_t *status, uint32_t max,
                         uint32_t min, uint64_t timeout_ns)
{
    int n;

    if (max && (!tags || !status))
        return IDMA_EINVAL;
    if ((n = idma_qpair_claim(q)) != 0)
        return n;
    n = (int)wait_into(q, NULL, tags, status, max, min, timeout_ns);
    idma_qpair_release(q);
    return n;
}

int idma_qpair_wait(struct idma_qpair *q, struct idma_cpl *out, uint32_t max, uint32_t min,
                    uint64_t timeout_ns)
{
    int n;

    if (max && !out)
        return IDMA_EINVAL;
    if ((n = idma_qpair_claim(q)) != 0)
        return n;
    n = (int)wait_into(q, out, NULL, NULL, max, min, timeout_ns);
    idma_qpair_release(q);
    return n;
}

int idma_qpair_find_cid(const struct idma_qpair *q, uint64_t tag)
{
    uint32_t i;

    if (!q || !tag)
        return -1;
    for (i = 0; i < q->ntrk; i++)
        if (q->trk[i].busy && q->trk[i].tag == tag)
            return (int)(((uint32_t)q->trk[i].gen << IDMA_CID_INDEX_BITS) | i);
    return -1;
}

uint32_t idma_qpair_inflight(const struct idma_qpair *q)
{
    return q ? q->ntrk - q->nfree : 0;
}

void idma_qpair_get_info(const struct idma_qpair *q, struct idma_qpair_info *out)
{
    memset(out, 0, sizeof(*out));
    if (!q)
        return;
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
    out->sq_mmio = q->sq_mmio;
    out->cq_mmio = q->cq_mmio;
    out->shadow = q->sq_shadow != NULL;
    out->cq_batch = q->cq_batch;
    out->sgl = q->sgl;
}
