/* Loaded into a restored VM's QEMU (LD_PRELOAD, engine/writetrack.py): registers the guest's RAM
 * mapping for userfaultfd's asynchronous write protection, so that the host can ask the kernel
 * which of its pages were written since it last asked (PAGEMAP_SCAN on /proc/<pid>/pagemap,
 * from the host's own process). A registration can only be made by the process that owns the
 * memory, and QEMU 7.2 makes none that the host could use (its background snapshot refuses a
 * private file mapping, which is what a restored VM's RAM is).
 *
 * With asynchronous protection the kernel resolves a write to a protected page by itself (no
 * thread of ours waits on events): the page is marked written, and the guest goes on. So the
 * userfaultfd stays open for the life of the process, unread; closing it would end the
 * registration.
 *
 * The RAM is told from QEMU's other mappings by its length (TENKI_TRACK_RAM_BYTES, set by the
 * host) and by being a private mapping of a file. Nothing else is changed: the mapping is made
 * as asked, and a registration that fails leaves QEMU running as it would have, untracked (the
 * host finds out from its scan and copies the written pages inside the stop, as before).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Linux 6.4 and 6.7; Debian 12's headers are older than both */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

static unsigned long long ram_bytes;
static int registered;

__attribute__((constructor)) static void tenki_writetrack_init(void) {
    const char *v = getenv("TENKI_TRACK_RAM_BYTES");
    ram_bytes = v ? strtoull(v, NULL, 10) : 0;
}

static void say(const char *what, int err) {
    /* into QEMU's log, where a launch failure is looked for too */
    dprintf(2, "tenki-writetrack: %s: %s\n", what, strerror(err));
}

static void track(void *addr, size_t len) {
    int u = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (u < 0) {
        say("userfaultfd", errno);
        return;
    }
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED};
    struct uffdio_register reg = {.range = {(uintptr_t)addr, len},
                                  .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(u, UFFDIO_API, &api) < 0) {
        say("UFFDIO_API", errno);
    } else if (ioctl(u, UFFDIO_REGISTER, &reg) < 0) {
        say("UFFDIO_REGISTER", errno);
    } else {
        registered = 1;
        return; /* u stays open: the registration lives as long as it does */
    }
    close(u);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    void *p = (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
    if (p != MAP_FAILED && !registered && ram_bytes && len == ram_bytes && fd >= 0 &&
        (flags & MAP_PRIVATE) && (prot & PROT_WRITE)) {
        int saved = errno;
        track(p, len);
        errno = saved;
    }
    return p;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
    __attribute__((alias("mmap")));
