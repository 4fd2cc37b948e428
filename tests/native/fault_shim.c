/* LD_PRELOAD shim for tests/test_checkpoint_native.py: makes the system calls of a
 * native checkpoint save (kasmina._fileio) fail like a real disk would, and reports
 * inode numbers with the top bit set (as some NFS and FUSE servers hand out).
 *
 * KASMINA_FAULT_ARMED   a path: faults are counted and injected only while it exists
 * KASMINA_FAULT_CALL    open_tmpfile | writev | fsync | linkat | rename
 * KASMINA_FAULT_NTH     the armed call of that kind that fails (1 = the first)
 * KASMINA_FAULT_ERRNO   the errno it fails with
 * KASMINA_FAULT_RUN     a scenario's name: counting starts afresh when it changes
 * KASMINA_HIGH_INODE    "1": st_ino | 1 << 63 in every fstat */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

static int counts[8];
static char run[64];

static int fault(const char *call, int slot) {
  const char *armed = getenv("KASMINA_FAULT_ARMED"), *wanted = getenv("KASMINA_FAULT_CALL");
  const char *this_run = getenv("KASMINA_FAULT_RUN");
  if (!armed || !wanted || strcmp(wanted, call) != 0 || access(armed, F_OK) != 0) return 0;
  if (this_run && strncmp(run, this_run, sizeof run - 1) != 0) { /* a new scenario: count afresh */
    memset(counts, 0, sizeof counts);
    strncpy(run, this_run, sizeof run - 1);
  }
  if (++counts[slot] != atoi(getenv("KASMINA_FAULT_NTH"))) return 0;
  errno = atoi(getenv("KASMINA_FAULT_ERRNO"));
  return 1;
}

/* The next definition of `name` (libc's), as a pointer of the type of ours. */
#define REAL(name) static __typeof__(&name) real_##name; \
  if (!real_##name) real_##name = (__typeof__(&name))dlsym(RTLD_NEXT, #name)

static int opened(const char *name, const char *path, int flags, va_list ap) {
  typedef int (*open_t)(const char *, int, ...);
  int mode = (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? va_arg(ap, int) : 0;
  if ((flags & O_TMPFILE) == O_TMPFILE && fault("open_tmpfile", 0)) return -1;
  open_t real = (open_t)dlsym(RTLD_NEXT, name);
  return real(path, flags, mode);
}

int open(const char *path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  int fd = opened("open", path, flags, ap);
  va_end(ap);
  return fd;
}

int open64(const char *path, int flags, ...) {
  va_list ap;
  va_start(ap, flags);
  int fd = opened("open64", path, flags, ap);
  va_end(ap);
  return fd;
}

ssize_t writev(int fd, const struct iovec *iov, int count) {
  REAL(writev);
  return fault("writev", 1) ? -1 : real_writev(fd, iov, count);
}

int fsync(int fd) {
  REAL(fsync);
  return fault("fsync", 2) ? -1 : real_fsync(fd);
}

int linkat(int from_dir, const char *from, int to_dir, const char *to, int flags) {
  REAL(linkat);
  return fault("linkat", 3) ? -1 : real_linkat(from_dir, from, to_dir, to, flags);
}

int rename(const char *from, const char *to) {
  REAL(rename);
  return fault("rename", 4) ? -1 : real_rename(from, to);
}

static void high(struct stat *st) {
  const char *on = getenv("KASMINA_HIGH_INODE");
  if (on && strcmp(on, "1") == 0) st->st_ino |= 1ULL << 63;
}

int fstat(int fd, struct stat *st) {
  REAL(fstat);
  int rc = real_fstat(fd, st);
  if (rc == 0) high(st);
  return rc;
}

int fstat64(int fd, struct stat64 *st) {
  REAL(fstat64);
  int rc = real_fstat64(fd, st);
  if (rc == 0) high((struct stat *)st);
  return rc;
}
