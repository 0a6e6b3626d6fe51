/*
 * A simulated NVMe I/O controller that completes every command at once, inside the caller's
 * thread: for a deterministic count of the engine's instructions per I/O (valgrind callgrind,
 * benchmarks/engine_cost.py) with no device, no thread and no timing in the loop.
 *
 * Only in the engine built with IDMA_SIM_DEVICE (`python native/build.py --sim`, module
 * iommu_dma._native_sim): there every doorbell write of the queue engine goes through
 * idma_sim_doorbell(), which stores the value like the MMIO write would and then lets the
 * simulated controller act on it. The production engine writes its doorbells directly and
 * contains none of this.
 *
 * On an SQ tail doorbell the controller fetches every SQE up to the new tail and posts one CQE
 * per command (NVMe Base 2.0 §4.6): CID of the command, SQ head after the fetch, SQ id = qid,
 * status success with the current phase tag (written last), DW0/DW1 zero. It never moves data.
 * It keeps one CQ slot empty (§4.1.2, CQ full when head == tail + 1): commands that do not fit
 * stay in the SQ until a CQ head doorbell makes room. Doorbell values outside the ring are
 * counted (bad_doorbells) and ignored, as a controller would refuse them.
 * Not thread safe: one thread drives the engine and so the device (all of this is for
 * single-threaded measurements and tests). Shadow doorbells are not simulated.
 */
#ifndef IDMA_SIM_DEVICE_H
#define IDMA_SIM_DEVICE_H
#include <stdint.h>

/* CDEF BEGIN */
enum { IDMA_SIM_MAX_QUEUES = 64, IDMA_SIM_MAX_DEVICES = 8 };

struct idma_sim;

/* Counters of one simulated queue pair. */
struct idma_sim_queue_info {
    uint32_t depth;
    uint32_t sq_head;           /* next SQE the controller fetches */
    uint32_t sq_tail;           /* last SQ tail doorbell value */
    uint32_t cq_tail;           /* next CQ slot the controller posts to */
    uint32_t cq_head;           /* last CQ head doorbell value */
    uint32_t phase;             /* phase tag of the next CQE posted */
    uint64_t fetched;           /* SQEs fetched = CQEs posted */
    uint64_t sq_doorbells;
    uint64_t cq_doorbells;
    uint64_t cq_full;           /* times a fetch stopped because the CQ was full */
    uint64_t bad_doorbells;     /* doorbell values >= depth (ignored) */
    uint64_t reads;             /* opcode 02h commands fetched */
    uint64_t writes;            /* opcode 01h commands fetched */
    uint16_t last_cid;          /* CID of the last command fetched */
};

/* A device over a caller-owned "BAR0" (zeroed memory of bar0_size bytes, the same pointer the
 * queue pairs get); doorbells at 0x1000 + (2 qid [+1]) * (4 << dstrd) as in §3.1.3.
 * NULL when more than IDMA_SIM_MAX_DEVICES exist or on a bad argument. */
struct idma_sim *idma_sim_new(volatile uint8_t *bar0, uint64_t bar0_size, uint32_t dstrd);
void idma_sim_free(struct idma_sim *s);
/* Serve queue pair qid (1..IDMA_SIM_MAX_QUEUES-1, or 0) over its rings: sq of depth 64-byte
 * SQEs, cq of depth 16-byte CQEs (zeroed), as Create I/O CQ/SQ would. 0, or -1 on a bad
 * argument (qid taken, doorbells outside BAR0, depth < 2). */
int idma_sim_attach(struct idma_sim *s, uint16_t qid, void *sq, void *cq, uint32_t depth);
/* 0 and *out filled, or -1 when qid is not served. */
int idma_sim_queue_info(const struct idma_sim *s, uint16_t qid, struct idma_sim_queue_info *out);
/* The doorbell write of the IDMA_SIM_DEVICE engine: *db = value, then the device acts on it
 * when db is a doorbell of an attached queue (any other address: only the store). */
void idma_sim_doorbell(volatile uint32_t *db, uint32_t value);
/*
 * Measurement window for callgrind (valgrind --tool=callgrind --instr-atstart=no): begin
 * starts instrumentation with counters zeroed, end dumps the counts of the window under
 * `label` (a part file of its own) and stops instrumentation. No-ops outside valgrind.
 * idma_sim_callgrind_built() is 0 when the engine was compiled without <valgrind/callgrind.h>.
 */
void idma_sim_callgrind_begin(void);
void idma_sim_callgrind_end(const char *label);
int idma_sim_callgrind_built(void);
int idma_sim_running_on_valgrind(void);
/* CDEF END */

#endif
