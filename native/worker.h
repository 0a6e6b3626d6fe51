/*
 * I/O worker: a closed-loop I/O generator over one queue pair, entirely in C (NVM Command Set
 * 1.0: Read 02h, Write 01h, Flush 00h, Dataset Management 09h; SLBA in CDW10-11, 0's based NLB
 * in CDW12 15:0).
 */
#ifndef IDMA_WORKER_H
#define IDMA_WORKER_H
#include <stdint.h>
#include "queue.h"

/* CDEF BEGIN */
/* Log-linear latency histogram: 32 linear sub-buckets per power of two of nanoseconds. */
enum { IDMA_HIST_SUB_BITS = 5, IDMA_HIST_BUCKETS = 1920 };
/* Distinct failed I/Os a worker result lists (the rest are only counted). */
enum { IDMA_WORKER_MAX_FAILED = 256 };
/* Block sizes of a split; seconds of the per-second series; op kinds (index of op_* arrays). */
enum { IDMA_WORKER_MAX_BS = 8, IDMA_WORKER_SERIES = 3600 };
enum { IDMA_OP_READ = 0, IDMA_OP_WRITE = 1, IDMA_OP_TRIM = 2, IDMA_OP_FLUSH = 3,
       IDMA_OP_KINDS = 4 };

struct idma_worker_cfg {
    uint32_t nsid;
    uint32_t lba_size;          /* bytes per LBA */
    uint32_t block_lbas;        /* LBAs per I/O (1..65536) */
    uint32_t qd;                /* commands kept in flight (<= trackers; queue must be idle) */
    uint32_t read_pct;          /* 0..100: share of reads, the rest are writes */
    uint32_t random;            /* 0: sequential blocks (wrapping), 1: uniform random blocks */
    uint32_t verify;            /* writes carry the LBA pattern, reads of written blocks check it */
    uint32_t verify_all;        /* with verify: check every read (data written by an earlier run) */
    uint64_t lba_start;         /* LBA range [lba_start, lba_start + lba_count) */
    uint64_t lba_count;
    uint64_t duration_ns;       /* stop submitting after this long (0 = no time limit) */
    uint64_t io_count;          /* stop after this many I/Os (0 = no count limit) */
    uint64_t seed;              /* PRNG seed and data pattern seed */
    uint64_t buf;               /* DMA area of qd * block_lbas * lba_size bytes (IOVA = VA) */
    uint64_t io_timeout_ns;     /* give up when nothing completes for this long (0 = 30 s) */
    uint32_t spin_only;         /* 1: always busy-poll; 0: sleep when the host is loaded */
    int32_t irq_fd;             /* eventfd of the queue's MSI-X vector: sleep on it while
                                 * waiting (interrupt/hybrid mode); -1 (any negative) = none,
                                 * polled. 0 is a valid fd: a zeroed cfg must set -1 */
    uint64_t idle_spin_ns;      /* polled, loaded host: spin this long before sleeping (0 =
                                 * 50 us); with irq_fd: spin this long after the last
                                 * completion before sleeping on it (0 = no spin: interrupt) */
    uint64_t idle_sleep_ns;     /* loaded host: nanosleep step while waiting (0 = 20 us) */
    /* Block-size split: nbs sizes (LBAs, each <= block_lbas, which sizes the slot buffers)
     * picked with weights bs_pct (summing to 100); an I/O of n LBAs starts at a multiple of n
     * from lba_start. nbs 0: every I/O is block_lbas. Not with verify. */
    uint32_t nbs;
    uint32_t bs_lbas[8];        /* IDMA_WORKER_MAX_BS */
    uint32_t bs_pct[8];
    /* Op mix: trim_pct% Dataset Management deallocates and flush_pct% Flushes (sum <= 100),
     * the other I/Os reads (read_pct% of them) and writes. Trims not with verify. */
    uint32_t trim_pct;
    uint32_t flush_pct;
    uint64_t rate_iops;         /* 0 = no cap; else submissions are paced by a token bucket
                                 * (one token deep) on the monotonic clock */
};

/* Live counters, written by the worker with relaxed atomic stores, readable from any thread. */
struct idma_worker_progress {
    volatile uint64_t ios;
    volatile uint64_t bytes;
    volatile uint64_t errors;
    volatile uint64_t verify_failures;
    volatile uint64_t elapsed_ns;
    volatile uint32_t running;  /* 1 while the worker runs */
    volatile uint32_t stop;     /* set to 1 by the caller to stop early (then drained) */
};

/* One failed I/O: the command (opcode, LBA, blocks) and the status it completed with. The same
 * command failing again with the same status is counted here, not listed again. */
struct idma_worker_failed_io {
    uint64_t lba;               /* first LBA of the I/O */
    uint64_t count;             /* completions of this I/O with this status */
    uint64_t first_ns;          /* when it first failed, ns since the start of the run */
    uint32_t nlb;               /* blocks (LBAs) of the I/O */
    uint16_t status;            /* 15-bit status (CQE DW3 31:17) */
    uint8_t opcode;             /* 01h Write, 02h Read, 00h Flush, 09h Dataset Management */
    uint8_t reserved;
};

/* I/Os that completed in one second of a run. */
struct idma_worker_second {
    uint64_t ios;
    uint64_t bytes;             /* of successful reads and writes */
    uint64_t lat_sum_ns;
    uint64_t lat_max_ns;
};

struct idma_worker_result {
    int32_t rc;                 /* 0 or an idma_rc */
    uint16_t first_error_status;    /* 15-bit status of the first failed command */
    uint8_t first_error_opcode;
    uint8_t timed_out;
    uint64_t first_error_lba;
    uint64_t ios;               /* completed I/Os (successful or not) */
    uint64_t reads;
    uint64_t writes;
    uint64_t bytes;             /* bytes of successful I/Os */
    uint64_t errors;            /* I/Os completed with a non-zero status */
    uint64_t verify_failures;   /* LBAs whose data did not match the pattern */
    uint64_t first_verify_lba;
    uint64_t verify_skipped;    /* successful reads not checked: a write to their block failed
                                 * in this run, so its content is unknown */
    uint64_t failed_listed;     /* failed I/Os accounted for in failed[] (sum of their counts);
                                 * errors - failed_listed failed I/Os are not listed */
    uint32_t nfailed;           /* entries of failed[] in use (<= IDMA_WORKER_MAX_FAILED) */
    uint32_t reserved2;
    struct idma_worker_failed_io failed[256];   /* IDMA_WORKER_MAX_FAILED, first seen first */
    uint64_t elapsed_ns;
    uint64_t lat_min_ns;
    uint64_t lat_avg_ns;
    uint64_t lat_p50_ns;
    uint64_t lat_p99_ns;
    uint64_t lat_p999_ns;
    uint64_t lat_max_ns;
    uint64_t hist[1920];        /* IDMA_HIST_BUCKETS */
    /* Per op kind (IDMA_OP_*): completed I/Os, bytes of successful ones (a trim: the LBAs it
     * deallocated), errors, latency min/max/sum and histogram. */
    uint64_t op_ios[4];         /* IDMA_OP_KINDS */
    uint64_t op_bytes[4];
    uint64_t op_errors[4];
    uint64_t op_lat_min_ns[4];  /* 0 when none completed */
    uint64_t op_lat_max_ns[4];
    uint64_t op_lat_sum_ns[4];
    uint64_t op_hist[4][1920];
    uint64_t trims;
    uint64_t flushes;
    uint64_t bs_ios[8];         /* completed I/Os of each size of the split (cfg bs_lbas[]) */
    /* Per-second series: second s holds the I/Os that completed in [s, s+1) s of the run
     * (the last entry also everything later); nseries entries used. */
    uint32_t nseries;
    uint32_t reserved3;
    struct idma_worker_second series[3600];     /* IDMA_WORKER_SERIES */
};

/*
 * Run the loop until io_count I/Os or duration_ns or progress->stop, then drain. The worker
 * holds the queue pair for the whole run (IDMA_EBUSY when another thread is using it).
 * With verify, every read buffer to be checked is poisoned before its read is submitted; a
 * read that fails is an I/O error, never a verify failure (its buffer holds no data); a write
 * that fails makes its block's content unknown, so reads of it are not checked (verify_skipped)
 * until a later write of the block succeeds. Every failed I/O is counted in errors and listed in
 * failed[] by command and status (the first IDMA_WORKER_MAX_FAILED distinct ones).
 * With irq_fd >= 0 (the queue's CQ created with IEN and that fd's MSI-X vector), the worker
 * sleeps on the eventfd whenever an empty poll follows idle_spin_ns without a completion, in
 * slices of at most 10 ms (so stop, closing and the I/O timeout are still noticed); it polls
 * the CQ after every wake-up and before every sleep. The fd must stay open for the run.
 * progress may be NULL. Returns 0 or an idma_rc (also stored in res->rc).
 */
int idma_worker_run(struct idma_qpair *q, const struct idma_worker_cfg *cfg,
                    struct idma_worker_result *res, struct idma_worker_progress *progress);

/* Data pattern: each 8-byte word k of LBA lba holds seed ^ (lba << 16 | k). */
void idma_pattern_fill(void *buf, uint64_t lba, uint32_t nlbas, uint32_t lba_size,
                       uint64_t seed);
/* Fill buf with the complement of the pattern: no word of it equals the expected data, so a
 * read that moved no data (or only part of it) into buf fails idma_pattern_check. */
void idma_pattern_poison(void *buf, uint64_t lba, uint32_t nlbas, uint32_t lba_size,
                         uint64_t seed);
/* Number of LBAs in buf that do not hold the pattern; *first_bad (may be NULL) gets the first. */
uint32_t idma_pattern_check(const void *buf, uint64_t lba, uint32_t nlbas, uint32_t lba_size,
                            uint64_t seed, uint64_t *first_bad);

/* Histogram bucket of a latency, and the [low, high] ns range a bucket stands for. */
uint32_t idma_hist_bucket(uint64_t ns);
uint64_t idma_hist_low(uint32_t bucket);
uint64_t idma_hist_high(uint32_t bucket);
/* Latency at percentile pct (0 < pct <= 100): the upper bound of the bucket holding it,
 * capped at max_ns. 0 when the histogram is empty. */
uint64_t idma_hist_percentile(const uint64_t *hist, double pct, uint64_t max_ns);
/* Fill lat_avg/p50/p99/p999 of res from its hist, lat_min/lat_max and a latency sum. */
void idma_hist_summarize(struct idma_worker_result *res, uint64_t lat_sum_ns);
/* CDEF END */

#endif
