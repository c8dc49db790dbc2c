/* Loaded into a VM's QEMU (LD_PRELOAD, engine/writetrack.py): on the host's signal,
 * registers the guest's RAM mapping for userfaultfd's asynchronous write protection, so that
 * the host can ask the kernel which of its pages were written since it last asked
 * (PAGEMAP_SCAN on /proc/<pid>/pagemap, from the host's own process); on another, ends that.
 * A registration can only be made by the process that owns the memory, and QEMU 7.2 makes none
 * that the host could use (its background snapshot refuses a private file mapping, which is
 * what a restored VM's RAM is).
 *
 * Registered only while a capture needs it (the host's TRACK_ON, then TRACK_OFF once the guest
 * runs again): a mapping registered for write protection gets no fault-around (a read fault
 * maps one page of the file instead of the cached ones around it), so a clone that is never
 * captured maps its snapshot's pages as it would without the library.
 *
 * With asynchronous protection the kernel resolves a write to a protected page by itself (no
 * thread of ours waits on events): the page is marked written, and the guest goes on. So the
 * userfaultfd stays open, unread, until TRACK_OFF closes it, which ends the registration.
 *
 * The RAM is told from QEMU's other mappings by its length (TENKI_TRACK_RAM_BYTES, set by the
 * host) and by being a writable mapping of a file: private for a restored VM (its snapshot's RAM
 * cache), shared for a booted one (its memfd). Nothing else is changed: the mapping is made
 * as asked, and a registration that fails leaves QEMU running as it would have, untracked (the
 * host finds out from its scan and copies the written pages inside the stop, as before). The
 * handlers make only system calls, which a signal handler may.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdint.h>
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

/* the host's signals (engine/writetrack.py: TRACK_ON, TRACK_OFF); QEMU's system emulation uses
 * no real-time signal */
#define TRACK_ON (SIGRTMAX - 3)
#define TRACK_OFF (SIGRTMAX - 4)

static unsigned long long ram_bytes;
static void *volatile ram; /* the guest's RAM, once QEMU mapped it */
static volatile int uffd = -1;

static void say(const char *what) {
    /* into QEMU's log: write(2) only, as a signal handler may */
    static const char prefix[] = "tenki-writetrack: registration failed at ";
    if (write(2, prefix, sizeof prefix - 1) < 0 || write(2, what, strlen(what)) < 0 ||
        write(2, "\n", 1) < 0) {
        return;
    }
}

static void track_on(int sig) {
    (void)sig;
    int saved = errno;
    if (uffd < 0 && ram != NULL) {
        int u = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        struct uffdio_api api = {
            .api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED};
        struct uffdio_register reg = {.range = {(uintptr_t)ram, ram_bytes},
                                      .mode = UFFDIO_REGISTER_MODE_WP};
        if (u < 0) {
            say("userfaultfd");
        } else if (ioctl(u, UFFDIO_API, &api) < 0) {
            say("UFFDIO_API");
            close(u);
        } else if (ioctl(u, UFFDIO_REGISTER, &reg) < 0) {
            say("UFFDIO_REGISTER");
            close(u);
        } else {
            uffd = u; /* open until TRACK_OFF: the registration lives as long as it does */
        }
    }
    errno = saved;
}

static void track_off(int sig) {
    (void)sig;
    int saved = errno;
    if (uffd >= 0) {
        close(uffd); /* the kernel drops the registration, its protections and markers */
        uffd = -1;
    }
    errno = saved;
}

__attribute__((constructor)) static void tenki_writetrack_init(void) {
    const char *v = getenv("TENKI_TRACK_RAM_BYTES");
    ram_bytes = v ? strtoull(v, NULL, 10) : 0;
    if (!ram_bytes) {
        return;
    }
    struct sigaction on = {.sa_handler = track_on, .sa_flags = SA_RESTART};
    struct sigaction off = {.sa_handler = track_off, .sa_flags = SA_RESTART};
    sigfillset(&on.sa_mask); /* one handler at a time */
    sigfillset(&off.sa_mask);
    sigaction(TRACK_ON, &on, NULL);
    sigaction(TRACK_OFF, &off, NULL);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    void *p = (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
    if (p != MAP_FAILED && ram == NULL && ram_bytes && len == ram_bytes && fd >= 0 &&
        (prot & PROT_WRITE)) {
        ram = p;
    }
    return p;
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
    __attribute__((alias("mmap")));
