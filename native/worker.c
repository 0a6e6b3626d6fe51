/* Closed-loop I/O worker over one queue pair: generate, submit, reap, verify, measure. */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include "irq.h"
#include "worker.h"

_Static_assert(IDMA_HIST_BUCKETS == (64 - IDMA_HIST_SUB_BITS + 1) << IDMA_HIST_SUB_BITS,
               "histogram covers every 64-bit latency");
_Static_assert(sizeof(((struct idma_worker_result *)0)->failed) ==
               IDMA_WORKER_MAX_FAILED * sizeof(struct idma_worker_failed_io),
               "failed[] holds IDMA_WORKER_MAX_FAILED entries");
_Static_assert(sizeof(((struct idma_worker_cfg *)0)->bs_lbas) == IDMA_WORKER_MAX_BS * 4 &&
               sizeof(((struct idma_worker_result *)0)->bs_ios) == IDMA_WORKER_MAX_BS * 8,
               "split arrays hold IDMA_WORKER_MAX_BS entries");
_Static_assert(sizeof(((struct idma_worker_result *)0)->series) ==
               IDMA_WORKER_SERIES * sizeof(struct idma_worker_second),
               "series[] holds IDMA_WORKER_SERIES entries");
_Static_assert(sizeof(((struct idma_worker_result *)0)->op_hist) ==
               IDMA_OP_KINDS * IDMA_HIST_BUCKETS * 8, "op_hist covers every op kind");

#define OPC_WRITE 0x01          /* NVM Command Set 1.0 §3.3.6 */
#define OPC_READ 0x02           /* NVM Command Set 1.0 §3.3.4 */
#define OPC_FLUSH 0x00          /* NVM Command Set 1.0 §3.3.2 */
#define OPC_DSM 0x09            /* NVM Command Set 1.0 §3.3.3 */
#define DSM_AD (1u << 2)        /* CDW11 Attribute - Deallocate */
#define DSM_RANGE_BYTES 16      /* one range: context attributes, length (LBAs), SLBA */
#define SUB (1u << IDMA_HIST_SUB_BITS)
#define DEFAULT_IO_TIMEOUT_NS 30000000000ull
#define DEFAULT_IDLE_SPIN_NS 50000ull       /* measured on the TCG bench under host load */
#define DEFAULT_IDLE_SLEEP_NS 20000ull
/* Two polls this far apart: we lost the CPU. Measured with benchmarks.qd1 (QD1, TCG bench):
 * 100 us also caught the guest's own timer ticks on an idle host (13% slower than spinning
 * only), 1 ms missed a competing process (no gain); 300 us: 3-8% slower idle, 18% faster
 * loaded. */
#define PREEMPT_GAP_NS 300000ull
/* Longest single sleep on the interrupt: bounds how late a stop request, a queue being closed
 * (its quiesce waits for us) and the I/O timeout are noticed while nothing completes. */
#define IRQ_SLICE_NS 10000000ull

/* ---- data pattern ---- */

void idma_pattern_fill(void *buf, uint64_t lba, uint32_t nlbas, uint32_t lba_size,
                       uint64_t seed)
{
    uint64_t *w = buf;
    uint32_t words = lba_size / 8;

    for (uint32_t i = 0; i < nlbas; i++, lba++)
        for (uint32_t k = 0; k < words; k++)
            *w++ = seed ^ (lba << 16 | k);
}

void idma_pattern_poison(void *buf, uint64_t lba, uint32_t nlbas, uint32_t lba_size,
                         uint64_t seed)
{
    idma_pattern_fill(buf, lba, nlbas, lba_size, ~seed);   /* every word: ~expected */
}

uint32_t idma_pattern_check(const void *buf, uint64_t lba, uint32_t nlbas, uint32_t lba_size,
                            uint64_t seed, uint64_t *first_bad)
{
    const uint64_t *w = buf;
    uint32_t words = lba_size / 8, bad = 0;

    for (uint32_t i = 0; i < nlbas; i++, lba++, w += words) {
        for (uint32_t k = 0; k < words; k++) {
            if (w[k] != (seed ^ (lba << 16 | k))) {
                if (!bad && first_bad)
                    *first_bad = lba;
                bad++;
                break;
            }
        }
    }
    return bad;
}

/* ---- latency histogram (log-linear) ---- */

static inline uint32_t hist_bucket(uint64_t ns)
{
    uint32_t msb, group;

    if (ns < SUB)
        return (uint32_t)ns;
    msb = 63u - (uint32_t)__builtin_clzll(ns);
    group = msb - IDMA_HIST_SUB_BITS + 1;
    return group * SUB + (uint32_t)((ns >> (msb - IDMA_HIST_SUB_BITS)) & (SUB - 1));
}

uint32_t idma_hist_bucket(uint64_t ns)
{
    return hist_bucket(ns);
}

uint64_t idma_hist_low(uint32_t bucket)
{
    uint32_t group = bucket / SUB, sub = bucket % SUB;

    return group ? (uint64_t)(SUB + sub) << (group - 1) : sub;
}

uint64_t idma_hist_high(uint32_t bucket)
{
    uint32_t group = bucket / SUB;

    return idma_hist_low(bucket) + (group ? (1ull << (group - 1)) - 1 : 0);
}

uint64_t idma_hist_percentile(const uint64_t *hist, double pct, uint64_t max_ns)
{
    uint64_t total = 0, rank, seen = 0;
    double want;

    for (uint32_t i = 0; i < IDMA_HIST_BUCKETS; i++)
        total += hist[i];
    if (!total)
        return 0;
    want = pct * (double)total / 100.0;
    rank = (uint64_t)want;
    if ((double)rank < want)
        rank++;                                 /* ceil: nearest-rank percentile */
    if (rank < 1)
        rank = 1;
    if (rank > total)
        rank = total;
    for (uint32_t i = 0; i < IDMA_HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen >= rank) {
            uint64_t v = idma_hist_high(i);
            return max_ns && v > max_ns ? max_ns : v;
        }
    }
    return max_ns;
}

void idma_hist_summarize(struct idma_worker_result *res, uint64_t lat_sum_ns)
{
    uint64_t total = 0;

    for (uint32_t i = 0; i < IDMA_HIST_BUCKETS; i++)
        total += res->hist[i];
    if (!total) {
        res->lat_min_ns = res->lat_avg_ns = res->lat_max_ns = 0;
        res->lat_p50_ns = res->lat_p99_ns = res->lat_p999_ns = 0;
        return;
    }
    res->lat_avg_ns = lat_sum_ns / total;
    res->lat_p50_ns = idma_hist_percentile(res->hist, 50.0, res->lat_max_ns);
    res->lat_p99_ns = idma_hist_percentile(res->hist, 99.0, res->lat_max_ns);
    res->lat_p999_ns = idma_hist_percentile(res->hist, 99.9, res->lat_max_ns);
}

/* ---- the loop ---- */

struct slot {
    uint64_t lba;
    uint64_t t_submit;
    uint32_t nlb;               /* LBAs of the I/O (0 for a flush) */
    uint8_t op;                 /* IDMA_OP_* */
    uint8_t bs;                 /* index in cfg->bs_lbas (0 without a split) */
    uint8_t check;              /* verify this read's data on completion */
    uint8_t busy;               /* submitted (or pending), not yet completed */
};

struct wstate {
    const struct idma_worker_cfg *cfg;
    struct idma_qpair *q;
    struct idma_worker_result *res;
    struct idma_worker_progress *prog;
    struct slot *slots;
    uint64_t *written;          /* verify: bitmap of blocks written in this run */
    uint64_t *unknown;          /* verify: blocks whose last write failed (content unknown) */
    struct idma_sqe *cmds;      /* pending (not yet accepted) commands */
    struct idma_io *io;
    uint64_t *lbas, *tags;      /* pending reads/writes of a plain run (see plain_run) */
    struct idma_cpl *cpl;
    uint32_t *idle;             /* slots waiting to be refilled (rate cap, end of run) */
    uint32_t npending, nidle;
    int failed;                 /* a submit was refused: issue nothing more, drain, report */
    uint64_t block_bytes, nblocks, next_lba, rng, issued, start;
    uint64_t interval, next_due;    /* rate cap: ns per token, when the next token is due */
    int fixed_op;               /* the op of every I/O when no draw decides it, else -1 */
    int plain;                  /* plain_run: one op, one size, no verify */
    uint64_t *plain_hist;       /* plain: res->op_hist[fixed_op] */
    uint64_t done;              /* completions counted (res->ios is derived at the end) */
    uint64_t sec_end;           /* when the series' current second ends */
    struct idma_worker_second *sec; /* its entry */
};

/* wyrand: a Weyl sequence (odd increment, full period 2^64) mixed by one 64x64->128 multiply. */
static inline uint64_t wyrand(uint64_t *state)
{
    uint64_t x = *state += 0xA0761D6478BD642Full;
    unsigned __int128 m = (unsigned __int128)x * (x ^ 0xE7037ED1A0B428DBull);

    return (uint64_t)(m >> 64) ^ (uint64_t)m;
}

static inline uint64_t next_rand(struct wstate *w)
{
    return wyrand(&w->rng);
}

/* A draw in [0, n) from a 64-bit random x: the high half of x * n (multiply and shift, no
 * division; uniform to within n / 2^64). */
static inline uint64_t below(uint64_t x, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)x * n) >> 64);
}

/* Sizes within 1..block_lbas, weights summing to 100. */
static int valid_split(const struct idma_worker_cfg *c)
{
    uint32_t sum = 0;

    if (c->nbs > IDMA_WORKER_MAX_BS)
        return 0;
    for (uint32_t i = 0; i < c->nbs; i++) {
        if (c->bs_lbas[i] == 0 || c->bs_lbas[i] > c->block_lbas || c->bs_pct[i] > 100)
            return 0;
        sum += c->bs_pct[i];
    }
    return sum == 100;
}

static int valid_cfg(const struct idma_worker_cfg *c, const struct idma_qpair *q,
                     const struct idma_worker_progress *p)
{
    struct idma_qpair_info info;

    if (!c || !q)
        return 0;
    idma_qpair_get_info(q, &info);
    if (info.free != info.trackers)             /* the worker owns every tag in flight */
        return 0;
    if (c->qd == 0 || c->qd > info.free || c->block_lbas == 0 || c->block_lbas > 65536)
        return 0;
    if (c->lba_size < 8 || c->lba_size % 8 || c->read_pct > 100 || !c->buf)
        return 0;
    if (c->lba_count < c->block_lbas || c->lba_start + c->lba_count < c->lba_start)
        return 0;
    if (c->trim_pct + c->flush_pct > 100 || (c->verify && (c->nbs || c->trim_pct)))
        return 0;
    if (c->trim_pct && (uint64_t)c->block_lbas * c->lba_size < DSM_RANGE_BYTES)
        return 0;                               /* a slot buffer holds the trim's range */
    if (c->nbs && !valid_split(c))
        return 0;
    return c->io_count || c->duration_ns || p;   /* something must end the run */
}

static int may_issue(const struct wstate *w, uint64_t now)
{
    const struct idma_worker_cfg *c = w->cfg;

    if (w->failed)
        return 0;
    if (w->prog && __atomic_load_n(&w->prog->stop, __ATOMIC_RELAXED))
        return 0;
    if (c->io_count && w->issued >= c->io_count)
        return 0;
    return !(c->duration_ns && now - w->start >= c->duration_ns);
}

static int bit_get(const uint64_t *map, uint64_t block)
{
    return (map[block / 64] >> (block % 64)) & 1;
}

static void bit_set(uint64_t *map, uint64_t block, int on)
{
    if (on)
        map[block / 64] |= 1ull << (block % 64);
    else
        map[block / 64] &= ~(1ull << (block % 64));
}

/* Index of the block an LBA of ours starts (slots only hold LBAs queue_io chose). */
static uint64_t block_of(const struct wstate *w, uint64_t lba)
{
    return (lba - w->cfg->lba_start) / w->cfg->block_lbas;
}

/* LBAs of the next I/O (a size of the split by its weight) and its index in the split. */
static uint32_t pick_size(struct wstate *w, uint8_t *idx)
{
    const struct idma_worker_cfg *c = w->cfg;
    uint32_t r, acc = 0;

    *idx = 0;
    if (!c->nbs)
        return c->block_lbas;
    r = (uint32_t)(next_rand(w) % 100);
    for (uint32_t k = 0; k + 1 < c->nbs; k++) {
        acc += c->bs_pct[k];
        if (r < acc) {
            *idx = (uint8_t)k;
            return c->bs_lbas[k];
        }
    }
    *idx = (uint8_t)(c->nbs - 1);               /* weights sum to 100: the rest */
    return c->bs_lbas[c->nbs - 1];
}

/* First LBA of an I/O of nlb LBAs: random ones at a multiple of nlb, sequential ones next to
 * the previous (wrapping at the end of the range). */
static inline uint64_t pick_lba(struct wstate *w, uint32_t nlb)
{
    const struct idma_worker_cfg *c = w->cfg;
    uint64_t lba;

    if (c->random)                              /* nblocks: lba_count / block_lbas */
        return c->lba_start + below(next_rand(w), c->nbs ? c->lba_count / nlb : w->nblocks) * nlb;
    if (w->next_lba + nlb > c->lba_count)
        w->next_lba = 0;
    lba = c->lba_start + w->next_lba;
    w->next_lba += nlb;
    return lba;
}

/* The op every I/O gets when no draw is needed (no trims or flushes, reads 0 or 100%), else
 * -1. The draw it saves would not change the op, only the random sequence of the LBAs. */
static int fixed_op(const struct idma_worker_cfg *c)
{
    if (c->trim_pct || c->flush_pct || (c->read_pct > 0 && c->read_pct < 100))
        return -1;
    return c->read_pct ? IDMA_OP_READ : IDMA_OP_WRITE;
}

/* A plain run: every I/O a read (or every one a write) of block_lbas, not verified. Its
 * commands differ only in SLBA and buffer (idma_qpair_submit_rw_claimed), and what it counts
 * per size and in bytes follows from the I/O and error counts (plain_totals). */
static int plain_run(const struct idma_worker_cfg *c)
{
    return fixed_op(c) >= 0 && !c->nbs && !c->verify;
}

static uint8_t pick_op(struct wstate *w)
{
    const struct idma_worker_cfg *c = w->cfg;

    if (w->fixed_op >= 0)
        return (uint8_t)w->fixed_op;
    if (c->trim_pct || c->flush_pct) {
        uint32_t r = (uint32_t)(next_rand(w) % 100);
        if (r < c->trim_pct)
            return IDMA_OP_TRIM;
        if (r < c->trim_pct + c->flush_pct)
            return IDMA_OP_FLUSH;
    }
    return (next_rand(w) % 100) < c->read_pct ? IDMA_OP_READ : IDMA_OP_WRITE;
}

static const uint8_t op_code[IDMA_OP_KINDS] = { OPC_READ, OPC_WRITE, OPC_DSM, OPC_FLUSH };

/* Command and data of slot i's I/O (buf: the slot's buffer). A trim's range (§3.3.3, one
 * range, Deallocate) is written into the slot's buffer, which stays the slot's until the
 * completion is reaped; a flush moves no data. */
static void build_cmd(struct wstate *w, const struct slot *s, uint64_t buf,
                      struct idma_sqe *cmd, struct idma_io *io)
{
    const struct idma_worker_cfg *c = w->cfg;

    memset(cmd, 0, sizeof(*cmd));
    cmd->cdw0 = op_code[s->op];
    cmd->nsid = c->nsid;
    io->buf = buf;
    io->len = (uint64_t)s->nlb * c->lba_size;
    if (s->op == IDMA_OP_FLUSH) {
        io->buf = io->len = 0;
        return;
    }
    if (s->op == IDMA_OP_TRIM) {
        uint8_t *range = (uint8_t *)(uintptr_t)buf;
        uint32_t attrs = 0, nlb = s->nlb;

        memcpy(range, &attrs, 4);
        memcpy(range + 4, &nlb, 4);
        memcpy(range + 8, &s->lba, 8);
        io->len = DSM_RANGE_BYTES;
        cmd->cdw10 = 0;                         /* NR: 0's based, one range */
        cmd->cdw11 = DSM_AD;
        return;
    }
    cmd->cdw10 = (uint32_t)s->lba;
    cmd->cdw11 = (uint32_t)(s->lba >> 32);
    cmd->cdw12 = s->nlb - 1;
}

/* queue_io of a plain run: only the LBA is drawn (op and size were set by init_plain); the
 * I/O is timed from now, the time of the submit call that follows in the same loop pass. */
static inline void queue_plain(struct wstate *w, uint32_t i, uint64_t now)
{
    const struct idma_worker_cfg *c = w->cfg;
    struct slot *s = &w->slots[i];
    uint32_t k = w->npending;

    if (c->random)                              /* pick_lba without a split */
        s->lba = c->lba_start + below(next_rand(w), w->nblocks) * c->block_lbas;
    else
        s->lba = pick_lba(w, c->block_lbas);
    s->busy = 1;
    s->t_submit = now;
    w->lbas[k] = s->lba;
    w->tags[k] = i;
    w->npending = k + 1;
    w->issued++;
}

/* Choose the next I/O (size, LBA, op) for slot i and append its command to the pending batch
 * (NVM Command Set 1.0 §3.3.4/§3.3.6: SLBA in CDW10-11, 0's based NLB in CDW12 15:0). */
static void queue_io(struct wstate *w, uint32_t i, uint64_t now)
{
    const struct idma_worker_cfg *c = w->cfg;
    struct slot *s = &w->slots[i];
    struct idma_sqe *cmd = &w->cmds[w->npending];
    struct idma_io *io = &w->io[w->npending];
    uint64_t block, buf = c->buf + (uint64_t)i * w->block_bytes;

    if (w->plain) {
        queue_plain(w, i, now);
        return;
    }
    s->nlb = pick_size(w, &s->bs);
    s->lba = pick_lba(w, s->nlb);
    s->op = pick_op(w);
    if (s->op == IDMA_OP_FLUSH) {
        s->lba = 0;
        s->nlb = 0;
    }
    s->check = 0;
    s->busy = 1;
    build_cmd(w, s, buf, cmd, io);
    io->tag = i;
    if (c->verify) {
        block = block_of(w, s->lba);
        s->check = s->op == IDMA_OP_READ && !bit_get(w->unknown, block) &&
                   (c->verify_all || bit_get(w->written, block));
        if (s->op == IDMA_OP_WRITE)
            idma_pattern_fill((void *)(uintptr_t)buf, s->lba, s->nlb, c->lba_size, c->seed);
        else if (s->check)                      /* a read that moves nothing must fail */
            idma_pattern_poison((void *)(uintptr_t)buf, s->lba, s->nlb, c->lba_size, c->seed);
    }
    w->npending++;
    w->issued++;
}

/* Rate cap: take the token when it is due (a bucket one token deep, refilled every interval
 * ns; a job that fell behind catches up by at most one token). */
static int take_token(struct wstate *w, uint64_t now)
{
    if (!w->interval)
        return 1;
    if (now < w->next_due)
        return 0;
    if (now - w->next_due > w->interval)
        w->next_due = now;
    w->next_due += w->interval;
    return 1;
}

/* Give idle slots new I/Os while the run goes on and the rate cap allows. */
static void refill(struct wstate *w, uint64_t now)
{
    uint64_t n = w->nidle;

    if (!n || !may_issue(w, now))               /* same answer for every slot of this call */
        return;
    if (w->cfg->io_count && w->cfg->io_count - w->issued < n)
        n = w->cfg->io_count - w->issued;
    while (n-- && take_token(w, now))
        queue_io(w, w->idle[--w->nidle], now);
}

/* flush_pending of a plain run: SLBAs and slots only, the command built by the queue; the
 * commands are timed from when queue_plain queued them (this pass's clock reading). */
static int flush_plain(struct wstate *w)
{
    const struct idma_worker_cfg *c = w->cfg;
    int k = idma_qpair_submit_rw_claimed(w->q, op_code[w->fixed_op], c->nsid, c->block_lbas,
                                         c->lba_size, w->lbas, w->tags, w->npending, c->buf,
                                         w->block_bytes);

    if (k < 0)
        return k;
    w->npending -= (uint32_t)k;
    if (w->npending) {
        memmove(w->lbas, w->lbas + k, w->npending * sizeof(*w->lbas));
        memmove(w->tags, w->tags + k, w->npending * sizeof(*w->tags));
    }
    return 0;
}

/* Submit the pending batch; keep what did not fit. Returns an idma_rc or 0. */
static int flush_pending(struct wstate *w, uint64_t now)
{
    int k;

    if (!w->npending)
        return 0;
    if (w->plain)
        return flush_plain(w);
    k = idma_qpair_submit_claimed(w->q, w->cmds, w->io, w->npending);
    if (k < 0)
        return k;
    for (int j = 0; j < k; j++)
        w->slots[w->io[j].tag].t_submit = now;
    w->npending -= (uint32_t)k;
    if (w->npending) {                          /* usually all were accepted: no library call */
        memmove(w->cmds, w->cmds + k, w->npending * sizeof(*w->cmds));
        memmove(w->io, w->io + k, w->npending * sizeof(*w->io));
    }
    return 0;
}

/* Count a failed I/O and list it: with an entry of the same command and status when there is
 * one, else in a new entry while failed[] has room. */
static void record_error(struct wstate *w, const struct slot *s, uint16_t status, uint64_t now)
{
    struct idma_worker_result *r = w->res;
    uint8_t opcode = op_code[s->op];
    uint32_t nlb = s->nlb, n = r->nfailed;
    struct idma_worker_failed_io *f;

    if (!r->errors++) {
        r->first_error_status = status;
        r->first_error_opcode = opcode;
        r->first_error_lba = s->lba;
    }
    if (n > IDMA_WORKER_MAX_FAILED)
        n = IDMA_WORKER_MAX_FAILED;
    for (uint32_t i = 0; i < n; i++) {
        f = &r->failed[i];
        if (f->lba == s->lba && f->status == status && f->opcode == opcode && f->nlb == nlb) {
            f->count++;
            r->failed_listed++;
            return;
        }
    }
    if (n == IDMA_WORKER_MAX_FAILED)
        return;                                 /* counted in errors only */
    f = &r->failed[n];
    f->lba = s->lba;
    f->nlb = nlb;
    f->status = status;
    f->opcode = opcode;
    f->count = 1;
    f->first_ns = now - w->start;
    r->nfailed = n + 1;
    r->failed_listed++;
}

/* The series entry of the second `now` falls in (the last entry takes everything later). */
static void next_second(struct wstate *w, uint64_t now)
{
    struct idma_worker_result *r = w->res;
    uint64_t sec = (now - w->start) / 1000000000ull;

    if (sec >= IDMA_WORKER_SERIES - 1) {
        sec = IDMA_WORKER_SERIES - 1;
        w->sec_end = UINT64_MAX;
    } else {
        w->sec_end = w->start + (sec + 1) * 1000000000ull;
    }
    w->sec = &r->series[sec];
    if (sec >= r->nseries)
        r->nseries = (uint32_t)sec + 1;
}

/* Latency of one completed I/O, per op kind and in its second of the series (which is
 * returned); the run's totals are summed from the per-op counts at the end (sum_ops). */
static struct idma_worker_second *count_latency(struct wstate *w, const struct slot *s,
                                                uint64_t lat, uint64_t now)
{
    struct idma_worker_result *r = w->res;
    uint32_t b = hist_bucket(lat);
    struct idma_worker_second *e;

    w->done++;
    r->op_ios[s->op]++;
    r->op_hist[s->op][b]++;
    r->op_lat_sum_ns[s->op] += lat;
    if (lat < r->op_lat_min_ns[s->op])
        r->op_lat_min_ns[s->op] = lat;
    if (lat > r->op_lat_max_ns[s->op])
        r->op_lat_max_ns[s->op] = lat;
    if (now >= w->sec_end)
        next_second(w, now);
    e = w->sec;
    e->ios++;
    e->lat_sum_ns += lat;
    e->lat_max_ns = lat > e->lat_max_ns ? lat : e->lat_max_ns;
    return e;
}

/* Bytes moved by reads and writes that succeeded. */
static uint64_t data_bytes(const struct idma_worker_result *r)
{
    return r->op_bytes[IDMA_OP_READ] + r->op_bytes[IDMA_OP_WRITE];
}

/* The run's totals from the per-op counts: I/Os, histogram, latency sum/min/max, bytes.
 * Returns the latency sum. */
static uint64_t sum_ops(struct idma_worker_result *r)
{
    uint64_t lat_sum = 0;

    r->lat_min_ns = UINT64_MAX;
    for (int k = 0; k < IDMA_OP_KINDS; k++) {
        r->ios += r->op_ios[k];
        lat_sum += r->op_lat_sum_ns[k];
        for (uint32_t i = 0; i < IDMA_HIST_BUCKETS; i++)
            r->hist[i] += r->op_hist[k][i];
        if (!r->op_ios[k])
            continue;
        if (r->op_lat_min_ns[k] < r->lat_min_ns)
            r->lat_min_ns = r->op_lat_min_ns[k];
        if (r->op_lat_max_ns[k] > r->lat_max_ns)
            r->lat_max_ns = r->op_lat_max_ns[k];
    }
    r->reads = r->op_ios[IDMA_OP_READ];
    r->writes = r->op_ios[IDMA_OP_WRITE];
    r->trims = r->op_ios[IDMA_OP_TRIM];
    r->flushes = r->op_ios[IDMA_OP_FLUSH];
    r->bytes = data_bytes(r);
    if (!r->ios)
        r->lat_min_ns = 0;
    return lat_sum;
}

/* What a plain run did not count per I/O: its op's I/Os and bytes, the size split's one
 * entry, each second's bytes (less the failed I/Os' already taken off). */
static void plain_totals(struct wstate *w)
{
    struct idma_worker_result *r = w->res;
    int op = w->fixed_op;

    r->op_ios[op] = w->done;
    r->op_bytes[op] = (w->done - r->op_errors[op]) * w->block_bytes;
    r->bs_ios[0] = w->done;
    for (uint32_t i = 0; i < r->nseries; i++)
        r->series[i].bytes += r->series[i].ios * w->block_bytes;
}

static void complete_io(struct wstate *w, const struct idma_cpl *cpl, uint64_t now)
{
    const struct idma_worker_cfg *c = w->cfg;
    struct idma_worker_result *r = w->res;
    struct slot *s = &w->slots[cpl->tag];      /* tag < qd: checked by reap() */
    uint64_t lat = now - s->t_submit, block = c->verify ? block_of(w, s->lba) : 0;
    uint64_t nbytes = (uint64_t)s->nlb * c->lba_size;
    unsigned is_read = s->op == IDMA_OP_READ, is_write = s->op == IDMA_OP_WRITE;
    struct idma_worker_second *sec;

    s->busy = 0;
    sec = count_latency(w, s, lat, now);
    if (s->op != IDMA_OP_FLUSH)
        r->bs_ios[s->bs]++;
    if (cpl->status) {
        r->op_errors[s->op]++;
        record_error(w, s, cpl->status, now);
        if (is_write && c->verify) {            /* what the block holds now is unknown */
            bit_set(w->unknown, block, 1);
            bit_set(w->written, block, 0);
        }
        return;                                 /* a failed read filled nothing: not checked */
    }
    r->op_bytes[s->op] += nbytes;
    if (!is_read && !is_write)
        return;                                 /* trim, flush: no data moved */
    sec->bytes += nbytes;
    if (is_read && c->verify && bit_get(w->unknown, block)) {
        r->verify_skipped++;                    /* a write to it failed (maybe while in flight) */
    } else if (s->check) {
        uint64_t bad_lba = 0;
        const void *buf = (const void *)(uintptr_t)(c->buf + cpl->tag * w->block_bytes);
        uint32_t bad = idma_pattern_check(buf, s->lba, s->nlb, c->lba_size, c->seed, &bad_lba);
        if (bad && !r->verify_failures)
            r->first_verify_lba = bad_lba;
        r->verify_failures += bad;
    } else if (is_write && c->verify) {
        bit_set(w->written, block, 1);
        bit_set(w->unknown, block, 0);
    }
}

static void publish(struct wstate *w, uint64_t now)
{
    struct idma_worker_progress *p = w->prog;

    if (!p)
        return;
    __atomic_store_n(&p->ios, w->done, __ATOMIC_RELAXED);
    __atomic_store_n(&p->bytes, w->plain ? (w->done - w->res->errors) * w->block_bytes
                                         : data_bytes(w->res), __ATOMIC_RELAXED);
    __atomic_store_n(&p->errors, w->res->errors, __ATOMIC_RELAXED);
    __atomic_store_n(&p->verify_failures, w->res->verify_failures, __ATOMIC_RELAXED);
    __atomic_store_n(&p->elapsed_ns, now - w->start, __ATOMIC_RELAXED);
}

/* Latencies of one reap call's completions: they share its clock reading, so the op's and the
 * second's sums and extremes are updated once per call (count_plain). */
struct lat_batch {
    uint64_t ios, sum, min, max;
};

/* A failed I/O of a plain run: counted and listed; its bytes are taken off its second in
 * advance (plain_totals adds ios * block_bytes). */
static void plain_error(struct wstate *w, const struct slot *s, uint16_t status, uint64_t now)
{
    w->res->op_errors[w->fixed_op]++;
    record_error(w, s, status, now);
    w->sec->bytes -= w->block_bytes;
}

static void count_plain(struct wstate *w, const struct lat_batch *b)
{
    struct idma_worker_result *r = w->res;
    struct idma_worker_second *e = w->sec;
    int op = w->fixed_op;

    w->done += b->ios;
    r->op_lat_sum_ns[op] += b->sum;
    if (b->min < r->op_lat_min_ns[op])
        r->op_lat_min_ns[op] = b->min;
    if (b->max > r->op_lat_max_ns[op])
        r->op_lat_max_ns[op] = b->max;
    e->ios += b->ios;
    e->lat_sum_ns += b->sum;
    e->lat_max_ns = b->max > e->lat_max_ns ? b->max : e->lat_max_ns;
}

/* reap of a plain run: latency per completion into the histogram and a lat_batch; a completed
 * slot gets its next I/O at once while the run goes on and the rate cap allows (refill's
 * rules), else waits in idle[]. */
static uint32_t reap_plain(struct wstate *w, uint64_t *now)
{
    const struct idma_worker_cfg *c = w->cfg;
    const struct idma_cpl *cpl = w->cpl;
    struct slot *slots = w->slots;
    uint64_t *hist = w->plain_hist, qd = c->qd, paced = w->interval, t, budget;
    uint64_t *lbas = w->lbas, *tags = w->tags, rng = w->rng, lba0 = c->lba_start;
    uint64_t nblocks = w->nblocks;
    uint32_t k = w->npending, nlb = c->block_lbas;
    struct lat_batch b = { 0, 0, UINT64_MAX, 0 };
    int n = idma_qpair_poll_claimed(w->q, w->cpl, c->qd);

    if (n <= 0)
        return 0;
    t = *now = idma_fast_ns();
    if (t >= w->sec_end)
        next_second(w, t);                      /* this call's completions: one second */
    budget = !may_issue(w, t) ? 0 : c->io_count ? c->io_count - w->issued : UINT64_MAX;
    for (int j = 0; j < n; j++) {
        uint64_t tag = cpl[j].tag, lat;
        struct slot *s;

        if (tag >= qd || !(s = &slots[tag])->busy)
            continue;                           /* not ours (cannot happen: idle at start) */
        s->busy = 0;
        lat = t - s->t_submit;
        hist[hist_bucket(lat)]++;
        b.ios++;
        b.sum += lat;
        b.min = lat < b.min ? lat : b.min;
        b.max = lat > b.max ? lat : b.max;
        if (cpl[j].status)
            plain_error(w, s, cpl[j].status, t);
        if (budget && (!paced || take_token(w, t))) {
            budget--;                           /* queue_plain, in this loop's locals */
            s->lba = c->random ? lba0 + below(wyrand(&rng), nblocks) * nlb : pick_lba(w, nlb);
            s->busy = 1;
            s->t_submit = t;
            lbas[k] = s->lba;
            tags[k++] = tag;
        } else {
            w->idle[w->nidle++] = (uint32_t)tag;
        }
    }
    w->rng = rng;
    w->issued += k - w->npending;
    w->npending = k;
    count_plain(w, &b);
    publish(w, t);
    return (uint32_t)n;
}

/* Reap completions and refill the freed slots. Returns how many completed. */
static uint32_t reap(struct wstate *w, uint64_t *now)
{
    int n;

    if (w->plain)
        return reap_plain(w, now);
    n = idma_qpair_poll_claimed(w->q, w->cpl, w->cfg->qd);
    if (n <= 0)
        return 0;
    *now = idma_fast_ns();
    for (int j = 0; j < n; j++) {
        if (w->cpl[j].tag >= w->cfg->qd || !w->slots[w->cpl[j].tag].busy)
            continue;                           /* not ours (cannot happen: idle at start) */
        complete_io(w, &w->cpl[j], *now);
        w->idle[w->nidle++] = (uint32_t)w->cpl[j].tag;
    }
    refill(w, *now);
    publish(w, *now);
    return (uint32_t)n;
}

/*
 * Interrupt wait: nothing was reaped, commands are in flight. After irq_spin ns without a
 * completion (0: at once), sleep on the MSI-X eventfd for one bounded slice; the caller polls
 * again whatever woke us. No completion is missed: the poll that found the CQ empty came
 * first, and a vector that fired since left the eventfd's counter non-zero, so the wait
 * returns at once (a count left over from a completion already reaped only costs one extra
 * empty poll). Returns 1 when it slept (*now updated), 0 while still spinning.
 */
static int irq_sleep(int *fd, uint64_t irq_spin, uint64_t last, uint64_t slice, uint64_t *now)
{
    uint64_t t = idma_fast_ns();
    int64_t n;

    if (t - last < irq_spin)
        return 0;                       /* hybrid: still spinning */
    n = idma_eventfd_wait(*fd, slice);
    if (n < 0)
        *fd = -1;                       /* unusable fd (cannot happen while the queue is
                                         * open): poll for the rest of the run */
    *now = idma_fast_ns();
    return 1;
}

/* How long a sleep may last: one slice, less when the rate cap's next token comes sooner
 * (the clock is read only then). */
static uint64_t sleep_slice(const struct wstate *w)
{
    uint64_t now;

    if (!w->interval || !w->nidle)
        return IRQ_SLICE_NS;
    now = idma_fast_ns();
    if (w->next_due <= now)
        return 0;
    return w->next_due - now < IRQ_SLICE_NS ? w->next_due - now : IRQ_SLICE_NS;
}

/* Nothing in flight, idle slots waiting for the rate cap's token: sleep until it is due (at
 * most one slice, so a stop request is noticed). */
static void token_sleep(const struct wstate *w)
{
    uint64_t d = sleep_slice(w);
    struct timespec ts = { (time_t)(d / 1000000000ull), (long)(d % 1000000000ull) };

    if (d)
        nanosleep(&ts, NULL);
}

static int loop(struct wstate *w)
{
    const struct idma_worker_cfg *c = w->cfg;
    uint64_t timeout = c->io_timeout_ns ? c->io_timeout_ns : DEFAULT_IO_TIMEOUT_NS;
    uint64_t now = w->start, last = w->start;
    uint64_t spin_ns = c->idle_spin_ns ? c->idle_spin_ns : DEFAULT_IDLE_SPIN_NS;
    uint64_t sleep_ns = c->idle_sleep_ns ? c->idle_sleep_ns : DEFAULT_IDLE_SLEEP_NS;
    uint64_t prev = w->start, loaded_until = 0, t;
    uint32_t idle = 0;
    int irq_fd = c->irq_fd;             /* < 0: polled */

    for (uint32_t i = 0; i < c->qd; i++)
        w->idle[w->nidle++] = c->qd - 1 - i;    /* slot 0 first */
    refill(w, now);
    for (;;) {
        if (idma_qpair_dead(w->q))
            return IDMA_ECLOSED;        /* being closed: its memory is about to go */
        if (w->interval && w->nidle) {
            now = idma_fast_ns();       /* rate cap: a token may have come (and the I/Os it
                                         * lets out are timed from now) */
            refill(w, now);
        }
        int rc = flush_pending(w, now);
        if (rc < 0 && !w->failed) {
            w->failed = rc;             /* drain what is in flight, then report */
            w->npending = 0;
        }
        if (!w->npending && !idma_qpair_inflight(w->q)) {
            if (!w->interval || !w->nidle || !may_issue(w, idma_fast_ns()))
                return w->failed;
            token_sleep(w);             /* paced: nothing to wait for but the next token */
            last = now = idma_fast_ns();
            continue;
        }
        if (reap(w, &now)) {
            last = prev = now;
            continue;
        }
        if (irq_fd >= 0 &&
            irq_sleep(&irq_fd, c->idle_spin_ns, last, sleep_slice(w), &now)) {
            if (now - last > timeout) { /* checked after every sleep, not every 64 polls */
                w->res->timed_out = 1;
                return IDMA_ETIMEDOUT;
            }
            continue;                   /* poll again before any further sleep */
        }
        /*
         * Spin, unless the host is short of cores: a gap between two empty polls means this
         * (virtual) CPU was descheduled, so the device emulation competes with our spinning
         * for a host core. Then, past spin_ns without a completion, sleep in sleep_ns steps
         * (an idle guest CPU halts and hands its host core over) for the next 256 I/Os.
         */
        if (irq_fd < 0 && !c->spin_only) {
            t = idma_fast_ns();
            if (t - prev > PREEMPT_GAP_NS)
                loaded_until = w->done + 256;
            if (w->done < loaded_until && t - last > spin_ns) {
                struct timespec ts = { 0, (long)sleep_ns };
                nanosleep(&ts, NULL);
                t = idma_fast_ns();
            }
            prev = t;
        }
        if ((++idle & 63) != 0)
            continue;                   /* clock only every 64 empty polls */
        now = idma_fast_ns();
        if (now - last > timeout) {
            w->res->timed_out = 1;
            return IDMA_ETIMEDOUT;
        }
    }
}

static int alloc_state(struct wstate *w)
{
    uint32_t qd = w->cfg->qd;

    w->slots = calloc(qd, sizeof(*w->slots));
    w->cmds = calloc(qd, sizeof(*w->cmds));
    w->io = calloc(qd, sizeof(*w->io));
    w->cpl = calloc(qd, sizeof(*w->cpl));
    w->idle = calloc(qd, sizeof(*w->idle));
    w->lbas = calloc(qd, sizeof(*w->lbas));
    w->tags = calloc(qd, sizeof(*w->tags));
    if (w->cfg->verify) {
        w->written = calloc((w->nblocks + 63) / 64, sizeof(uint64_t));
        w->unknown = calloc((w->nblocks + 63) / 64, sizeof(uint64_t));
    }
    return w->slots && w->cmds && w->io && w->cpl && w->idle && w->lbas && w->tags &&
           ((w->written && w->unknown) || !w->cfg->verify);
}

/* A plain run's slots keep one op and size for the whole run. */
static void init_plain(struct wstate *w)
{
    w->plain = plain_run(w->cfg);
    if (!w->plain)
        return;
    w->plain_hist = w->res->op_hist[w->fixed_op];
    for (uint32_t i = 0; i < w->cfg->qd; i++) {
        w->slots[i].nlb = w->cfg->block_lbas;
        w->slots[i].op = (uint8_t)w->fixed_op;
    }
}

static void free_state(struct wstate *w)
{
    free(w->slots);
    free(w->cmds);
    free(w->io);
    free(w->cpl);
    free(w->idle);
    free(w->lbas);
    free(w->tags);
    free(w->written);
    free(w->unknown);
}

int idma_worker_run(struct idma_qpair *q, const struct idma_worker_cfg *cfg,
                    struct idma_worker_result *res, struct idma_worker_progress *progress)
{
    struct wstate w;
    uint64_t lat_sum;
    int rc;

    if (!res)
        return IDMA_EINVAL;
    memset(res, 0, sizeof(*res));
    if (q && idma_qpair_claim(q)) {
        res->rc = IDMA_EBUSY;
        return IDMA_EBUSY;
    }
    if (!valid_cfg(cfg, q, progress)) {
        if (q)
            idma_qpair_release(q);
        res->rc = IDMA_EINVAL;
        return IDMA_EINVAL;
    }
    memset(&w, 0, sizeof(w));
    w.cfg = cfg;
    w.q = q;
    w.res = res;
    w.prog = progress;
    w.block_bytes = (uint64_t)cfg->block_lbas * cfg->lba_size;
    w.nblocks = cfg->lba_count / cfg->block_lbas;
    if (cfg->rate_iops)                 /* ns per token, rounded up: never above the cap */
        w.interval = (1000000000ull + cfg->rate_iops - 1) / cfg->rate_iops;
    for (int k = 0; k < IDMA_OP_KINDS; k++)
        res->op_lat_min_ns[k] = UINT64_MAX;
    w.rng = cfg->seed ^ 0x9E3779B97F4A7C15ull;
    if (!w.rng)
        w.rng = 1;
    if (progress)
        __atomic_store_n(&progress->running, 1, __ATOMIC_RELAXED);
#ifdef __linux__
    /* sleeps while waiting should be short, not rounded up by the 50 us default slack */
    int slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    if (!cfg->spin_only)
        prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0);
#endif
    w.start = idma_fast_ns();
    w.next_due = w.start;
    w.sec_end = w.start;                /* the first completion picks its second */
    w.sec = &res->series[0];
    w.fixed_op = fixed_op(cfg);
    rc = alloc_state(&w) ? (init_plain(&w), loop(&w)) : IDMA_ENOMEM;
#ifdef __linux__
    if (!cfg->spin_only && slack > 0)
        prctl(PR_SET_TIMERSLACK, (unsigned long)slack, 0, 0, 0);
#endif
    res->elapsed_ns = idma_fast_ns() - w.start;
    if (w.plain)
        plain_totals(&w);
    lat_sum = sum_ops(res);
    for (int k = 0; k < IDMA_OP_KINDS; k++)
        if (!res->op_ios[k])
            res->op_lat_min_ns[k] = 0;
    idma_hist_summarize(res, lat_sum);
    publish(&w, w.start + res->elapsed_ns);
    if (progress)
        __atomic_store_n(&progress->running, 0, __ATOMIC_RELEASE);
    free_state(&w);
    idma_qpair_release(q);
    res->rc = rc;
    return rc;
}
