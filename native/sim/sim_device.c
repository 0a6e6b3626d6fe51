/* Simulated NVMe controller completing every command at once (see sim_device.h). */
#include <stdlib.h>
#include <string.h>
#include "../queue.h"
#include "sim_device.h"

#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define HAVE_CALLGRIND 1
#endif
#endif
#ifndef HAVE_CALLGRIND
#define HAVE_CALLGRIND 0
#endif

struct sim_queue {
    struct idma_sqe *sq;
    volatile struct idma_cqe *cq;
    struct idma_sim_queue_info info;
    int attached;
};

struct idma_sim {
    volatile uint8_t *bar0;
    uint64_t bar0_size;
    uint32_t dstrd;
    struct sim_queue q[IDMA_SIM_MAX_QUEUES];
};

static struct idma_sim *devices[IDMA_SIM_MAX_DEVICES];

struct idma_sim *idma_sim_new(volatile uint8_t *bar0, uint64_t bar0_size, uint32_t dstrd)
{
    struct idma_sim *s;
    int slot = -1;

    if (!bar0 || bar0_size < 0x1000 + 8 || dstrd > 15)
        return NULL;
    for (int i = 0; i < IDMA_SIM_MAX_DEVICES && slot < 0; i++)
        if (!devices[i])
            slot = i;
    if (slot < 0 || !(s = calloc(1, sizeof(*s))))
        return NULL;
    s->bar0 = bar0;
    s->bar0_size = bar0_size;
    s->dstrd = dstrd;
    devices[slot] = s;
    return s;
}

void idma_sim_free(struct idma_sim *s)
{
    for (int i = 0; i < IDMA_SIM_MAX_DEVICES; i++)
        if (devices[i] == s)
            devices[i] = NULL;
    free(s);
}

int idma_sim_attach(struct idma_sim *s, uint16_t qid, void *sq, void *cq, uint32_t depth)
{
    struct sim_queue *q;

    if (!s || qid >= IDMA_SIM_MAX_QUEUES || !sq || !cq || depth < 2 || depth > IDMA_MAX_DEPTH)
        return -1;
    if (idma_cq_doorbell_offset(qid, s->dstrd) + 4 > s->bar0_size)
        return -1;
    q = &s->q[qid];
    if (q->attached)
        return -1;
    memset(q, 0, sizeof(*q));
    q->sq = sq;
    q->cq = cq;
    q->info.depth = depth;
    q->info.phase = 1;                  /* §4.6: phase 1 on the first pass through the CQ */
    q->attached = 1;
    return 0;
}

int idma_sim_queue_info(const struct idma_sim *s, uint16_t qid, struct idma_sim_queue_info *out)
{
    if (!s || qid >= IDMA_SIM_MAX_QUEUES || !s->q[qid].attached)
        return -1;
    *out = s->q[qid].info;
    return 0;
}

/* Fetch SQEs up to the tail while the CQ has room; one CQE each, phase tag stored last. */
static void run_queue(struct sim_queue *q, uint16_t qid)
{
    struct idma_sim_queue_info *in = &q->info;

    while (in->sq_head != in->sq_tail) {
        uint32_t next_tail = in->cq_tail + 1 == in->depth ? 0 : in->cq_tail + 1;
        const struct idma_sqe *e = &q->sq[in->sq_head];
        volatile struct idma_cqe *c = &q->cq[in->cq_tail];
        uint8_t opcode = (uint8_t)(e->cdw0 & 0xFF);
        uint16_t cid = (uint16_t)(e->cdw0 >> 16);

        if (next_tail == in->cq_head) {
            in->cq_full++;              /* CQ full: the rest waits for a CQ head doorbell */
            return;
        }
        in->sq_head = in->sq_head + 1 == in->depth ? 0 : in->sq_head + 1;
        in->fetched++;
        in->reads += opcode == 0x02;
        in->writes += opcode == 0x01;
        in->last_cid = cid;
        c->dw0 = 0;
        c->dw1 = 0;
        c->sq_head = (uint16_t)in->sq_head;
        c->sq_id = qid;
        c->cid = cid;
        __atomic_thread_fence(__ATOMIC_RELEASE);
        c->status = (uint16_t)in->phase;    /* status 0 (success), phase tag bit 0 */
        in->cq_tail = next_tail;
        if (next_tail == 0)
            in->phase ^= 1;
    }
}

void idma_sim_doorbell(volatile uint32_t *db, uint32_t value)
{
    *db = value;
    for (int i = 0; i < IDMA_SIM_MAX_DEVICES; i++) {
        struct idma_sim *s = devices[i];
        uint64_t off, stride, index;
        struct sim_queue *q;

        if (!s || (const volatile uint8_t *)db < s->bar0 + 0x1000 ||
            (const volatile uint8_t *)db >= s->bar0 + s->bar0_size)
            continue;
        off = (uint64_t)((const volatile uint8_t *)db - s->bar0) - 0x1000;
        stride = 4ull << s->dstrd;
        index = off / stride;
        if (off % stride || index / 2 >= IDMA_SIM_MAX_QUEUES)
            return;
        q = &s->q[index / 2];
        if (!q->attached)
            return;
        if (value >= q->info.depth) {
            q->info.bad_doorbells++;
            return;
        }
        if (index & 1) {                /* CQ head doorbell: room for held-back commands */
            q->info.cq_head = value;
            q->info.cq_doorbells++;
        } else {
            q->info.sq_tail = value;
            q->info.sq_doorbells++;
        }
        run_queue(q, (uint16_t)(index / 2));
        return;
    }
}

void idma_sim_callgrind_begin(void)
{
#if HAVE_CALLGRIND
    CALLGRIND_START_INSTRUMENTATION;
    CALLGRIND_ZERO_STATS;
#endif
}

void idma_sim_callgrind_end(const char *label)
{
#if HAVE_CALLGRIND
    CALLGRIND_DUMP_STATS_AT(label);
    CALLGRIND_STOP_INSTRUMENTATION;
#else
    (void)label;
#endif
}

int idma_sim_callgrind_built(void)
{
    return HAVE_CALLGRIND;
}

int idma_sim_running_on_valgrind(void)
{
#if HAVE_CALLGRIND
    return (int)RUNNING_ON_VALGRIND;
#else
    return 0;
#endif
}
