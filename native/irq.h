/*
 * Sleeping on an interrupt: an MSI-X vector wired by VFIO to an eventfd. The kernel adds 1 to
 * the eventfd's counter each time the vector fires; reading it returns the count and clears it.
 */
#ifndef IDMA_IRQ_H
#define IDMA_IRQ_H
#include <stdint.h>

/* CDEF BEGIN */
/*
 * Wait up to timeout_ns for the eventfd to be signalled (UINT64_MAX: no limit), then clear it.
 * Returns the interrupts counted since it was last cleared (>= 1), 0 on timeout or when
 * interrupted by a signal, or -errno (e.g. -EBADF for a closed fd). Sleeps in the kernel: no
 * CPU is used while waiting (the GIL is released by cffi around the call).
 */
int64_t idma_eventfd_wait(int fd, uint64_t timeout_ns);
/* Add 1 to the eventfd's counter (wakes a waiter): 0 or -errno. */
int idma_eventfd_signal(int fd);
/* CDEF END */

#endif
