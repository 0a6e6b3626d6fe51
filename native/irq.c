/* Sleeping on an MSI-X eventfd (see irq.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include "irq.h"

int64_t idma_eventfd_wait(int fd, uint64_t timeout_ns)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    struct timespec ts, *tsp = NULL;
    uint64_t count;
    int rc;

    if (timeout_ns != UINT64_MAX) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000ull);
        ts.tv_nsec = (long)(timeout_ns % 1000000000ull);
        tsp = &ts;
    }
    rc = ppoll(&p, 1, tsp, NULL);
    if (rc < 0)
        return errno == EINTR ? 0 : -errno;
    if (rc == 0)
        return 0;
    if (p.revents & POLLNVAL)
        return -EBADF;
    /* the fd is non-blocking: another reader may have cleared it since ppoll returned */
    if (read(fd, &count, sizeof(count)) != (ssize_t)sizeof(count))
        return errno == EAGAIN ? 0 : -errno;
    return (int64_t)count;
}

int idma_eventfd_signal(int fd)
{
    uint64_t one = 1;

    return write(fd, &one, sizeof(one)) == (ssize_t)sizeof(one) ? 0 : -errno;
}
