// kasmina._fileio.commit_pair: the file-system part of one durable checkpoint save
// (kasmina/checkpoint.py, CheckpointManager._commit) in one call that releases the GIL.
// The module also holds the saves' SHA-256 (sha256_hex, sha256.cpp).
//
// Two unnamed files (O_TMPFILE) in the folder get the payload and the sidecar; the
// sidecar's write-back is started at once (posix_fadvise DONTNEED: on ext4 its data then
// rides along with the payload fsync's journal commit, so the sidecar fsync finds little
// to do); both are fsynced, linked under their final names (linkat through /proc/self/fd,
// which never replaces a file) and the folder is fsynced. Only then are retention's moves
// into archive/ made. durable=false skips the hint and the fsyncs.
//
// Why native: made from Python, the same system calls cost a durable 1 KB save about a
// third more than the bare write it is measured against, because every fsync puts the
// thread to sleep and the interpreter code that runs after each one starts cold. The
// Python path (kasmina/durable_io.py) stays for systems without unnamed files and is
// tested to write the same files.
//
// Returns (inode of the sidecar, failed moves), or NAME_TAKEN when a final name exists
// (nothing of the call remains: the caller picks new names), or NO_ANONYMOUS when the
// folder cannot make or link unnamed files (the caller writes named temp files instead).
// Other failures raise OSError with the errno and a `stage` attribute ("writing the
// payload", ...), leaving nothing of the save behind.
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "sha256.h"

namespace {

enum Outcome { kCommitted = 0, kNameTaken = -1, kNoAnonymous = -2, kFailed = -3 };

struct Failure {
  const char* stage = nullptr;
  int error = 0;
};

// One retention move: a checkpoint's sidecar, then its payload, into archive/.
struct Move {
  std::string sidecar_from, sidecar_to, payload_from, payload_to;
};

// What open(O_TMPFILE) answers where unnamed files are not supported (old kernels: EISDIR),
// and what linking /proc/self/fd/N answers where they cannot be linked (no hard links,
// no /proc of this process): the same sets as kasmina/durable_io.py's.
bool no_tmpfile(int error) { return error == EOPNOTSUPP || error == ENOTSUP || error == EISDIR || error == EINVAL; }

bool no_anonymous_link(int error) {
  return no_tmpfile(error) || error == EPERM || error == EMLINK || error == ENOSYS || error == ENOENT || error == EXDEV;
}

// Writes every byte; advances the entries of `iov` past what a short write took.
int write_all(int fd, std::vector<iovec>& iov) {
  size_t first = 0;
  while (first < iov.size()) {
    int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    ssize_t done = writev(fd, &iov[first], count);
    if (done < 0 && errno == EINTR) continue;
    if (done <= 0) {
      if (done == 0) errno = EIO;
      return -1;
    }
    while (first < iov.size() && static_cast<size_t>(done) >= iov[first].iov_len) {
      done -= static_cast<ssize_t>(iov[first].iov_len);
      ++first;
    }
    if (first < iov.size()) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + done;
      iov[first].iov_len -= static_cast<size_t>(done);
    }
  }
  return 0;
}

int fsync_retrying(int fd) {
  int rc;
  do rc = fsync(fd);
  while (rc != 0 && errno == EINTR);
  return rc;
}

int link_anonymous(int fd, int dir_fd, const char* name) {
  char proc[64];
  std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
  return linkat(AT_FDCWD, proc, dir_fd, name, AT_SYMLINK_FOLLOW);
}

// Closes its descriptors, and removes the names it published unless told to keep them.
struct Commit {
  int dir_fd = -1, payload_fd = -1, sidecar_fd = -1;
  const char* payload_name = nullptr;
  const char* sidecar_name = nullptr;
  bool keep = false;

  ~Commit() {
    int saved = errno;
    if (!keep) {
      if (sidecar_name) unlinkat(dir_fd, sidecar_name, 0);
      if (payload_name) unlinkat(dir_fd, payload_name, 0);
    }
    if (sidecar_fd >= 0) close(sidecar_fd);
    if (payload_fd >= 0) close(payload_fd);
    if (dir_fd >= 0) close(dir_fd);
    errno = saved;
  }
};

Outcome fail(Failure& failure, const char* stage) {
  failure.stage = stage;
  failure.error = errno;
  return kFailed;
}

// The system calls, without the GIL: kCommitted with the sidecar's `inode`, kNameTaken,
// kNoAnonymous, or kFailed with `failure` filled in. `move_errors` gets (move index,
// errno) for moves that failed (a missing file is not a failure: someone else moved or
// deleted it).
Outcome commit(const char* folder, std::vector<iovec>& payload, std::vector<iovec>& sidecar, const char* payload_name,
               const char* sidecar_name, bool durable, const std::vector<Move>& moves, unsigned long long& inode,
               Failure& failure, std::vector<std::pair<size_t, int>>& move_errors) {
  Commit c;
  c.dir_fd = open(folder, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (c.dir_fd < 0) return fail(failure, "opening the folder");
  c.payload_fd = open(folder, O_RDWR | O_TMPFILE | O_CLOEXEC, 0644);
  if (c.payload_fd < 0) return no_tmpfile(errno) ? kNoAnonymous : fail(failure, "writing the payload");
  if (write_all(c.payload_fd, payload) != 0) return fail(failure, "writing the payload");
  c.sidecar_fd = open(folder, O_RDWR | O_TMPFILE | O_CLOEXEC, 0644);
  if (c.sidecar_fd < 0 || write_all(c.sidecar_fd, sidecar) != 0) return fail(failure, "writing the sidecar");
  if (durable) {
    (void)posix_fadvise(c.sidecar_fd, 0, 0, POSIX_FADV_DONTNEED);  // a hint nobody has to take
    if (fsync_retrying(c.payload_fd) != 0 || fsync_retrying(c.sidecar_fd) != 0)
      return fail(failure, "syncing the payload and sidecar");
  }
  // A refused link: the name is taken (kNameTaken), or the folder cannot link unnamed
  // files (kNoAnonymous: the payload's name, if linked, is removed on the way out).
  for (auto [fd, name] : {std::pair{c.payload_fd, payload_name}, std::pair{c.sidecar_fd, sidecar_name}}) {
    if (link_anonymous(fd, c.dir_fd, name) != 0) {
      if (errno == EEXIST) return kNameTaken;
      return no_anonymous_link(errno) ? kNoAnonymous : fail(failure, "publishing the checkpoint");
    }
    (fd == c.payload_fd ? c.payload_name : c.sidecar_name) = name;
  }
  struct stat info;
  if (fstat(c.sidecar_fd, &info) != 0) return fail(failure, "publishing the checkpoint");
  if (durable && fsync_retrying(c.dir_fd) != 0) return fail(failure, "syncing the folder");
  c.keep = true;
  inode = static_cast<unsigned long long>(info.st_ino);
  for (size_t i = 0; i < moves.size(); ++i) {  // sidecar first: the checkpoint leaves active/ atomically
    const Move& move = moves[i];
    if (std::rename(move.sidecar_from.c_str(), move.sidecar_to.c_str()) != 0 && errno != ENOENT) {
      move_errors.emplace_back(i, errno);
      continue;  // its payload stays with it
    }
    if (std::rename(move.payload_from.c_str(), move.payload_to.c_str()) != 0 && errno != ENOENT)
      move_errors.emplace_back(i, errno);
  }
  return kCommitted;
}

// Holds the buffers of the Python objects for the duration of the call.
struct Buffers {
  std::vector<Py_buffer> views;
  ~Buffers() {
    for (Py_buffer& view : views) PyBuffer_Release(&view);
  }
  bool add(PyObject* object, std::vector<iovec>& iov) {
    Py_buffer view;
    if (PyObject_GetBuffer(object, &view, PyBUF_SIMPLE) != 0) return false;
    views.push_back(view);
    iov.push_back({view.buf, static_cast<size_t>(view.len)});
    return true;
  }
};

bool parse_moves(PyObject* moves, std::vector<Move>& out) {
  Py_ssize_t count = PyTuple_Size(moves);
  for (Py_ssize_t i = 0; i < count; ++i) {
    const char *a, *b, *c, *d;
    if (!PyArg_ParseTuple(PyTuple_GET_ITEM(moves, i), "yyyy;each move is (sidecar, its target, payload, its target)", &a,
                          &b, &c, &d))
      return false;
    out.push_back({a, b, c, d});
  }
  return true;
}

PyObject* commit_pair_checked(PyObject* args) {
  const char *folder, *payload_name, *sidecar_name;
  PyObject *chunks, *sidecar_object, *moves_object;
  int durable;
  if (!PyArg_ParseTuple(args, "yO!OyypO!", &folder, &PyTuple_Type, &chunks, &sidecar_object, &payload_name,
                        &sidecar_name, &durable, &PyTuple_Type, &moves_object))
    return nullptr;
  Buffers buffers;
  std::vector<iovec> payload, sidecar;
  Py_ssize_t count = PyTuple_GET_SIZE(chunks);
  buffers.views.reserve(static_cast<size_t>(count) + 1);
  for (Py_ssize_t i = 0; i < count; ++i)
    if (!buffers.add(PyTuple_GET_ITEM(chunks, i), payload)) return nullptr;
  if (!buffers.add(sidecar_object, sidecar)) return nullptr;
  std::vector<Move> moves;
  if (!parse_moves(moves_object, moves)) return nullptr;
  Failure failure;
  std::vector<std::pair<size_t, int>> move_errors;
  move_errors.reserve(moves.size() * 2);  // no allocation while the GIL is released
  unsigned long long inode = 0;
  Outcome outcome;
  Py_BEGIN_ALLOW_THREADS;
  outcome = commit(folder, payload, sidecar, payload_name, sidecar_name, durable != 0, moves, inode, failure,
                   move_errors);
  Py_END_ALLOW_THREADS;
  if (outcome == kFailed) {
    PyObject* error = PyObject_CallFunction(PyExc_OSError, "is", failure.error, std::strerror(failure.error));
    if (error == nullptr) return nullptr;
    PyObject* stage = PyUnicode_FromString(failure.stage);
    if (stage != nullptr && PyObject_SetAttrString(error, "stage", stage) == 0)
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error)), error);
    Py_XDECREF(stage);
    Py_DECREF(error);
    return nullptr;
  }
  if (outcome != kCommitted) return PyLong_FromLong(outcome);
  PyObject* errors = PyTuple_New(static_cast<Py_ssize_t>(move_errors.size()));
  if (errors == nullptr) return nullptr;
  for (size_t i = 0; i < move_errors.size(); ++i) {
    PyObject* item = Py_BuildValue("(ni)", static_cast<Py_ssize_t>(move_errors[i].first), move_errors[i].second);
    if (item == nullptr) {
      Py_DECREF(errors);
      return nullptr;
    }
    PyTuple_SET_ITEM(errors, static_cast<Py_ssize_t>(i), item);
  }
  return Py_BuildValue("(KN)", inode, errors);
}

// C++ allocation failures become MemoryError instead of ending the process.
PyObject* commit_pair(PyObject*, PyObject* args) {
  try {
    return commit_pair_checked(args);
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
}

PyMethodDef methods[] = {
    {"commit_pair", commit_pair, METH_VARARGS,
     "commit_pair(folder, payload_chunks, sidecar, payload_name, sidecar_name, durable, moves)\n"
     "Write, sync and link a checkpoint's payload (a tuple of buffers) and sidecar, then make the\n"
     "retention moves ((sidecar, target, payload, target) tuples). Paths and names are bytes\n"
     "(os.fsencode). Returns (sidecar inode,\n"
     "((move index, errno), ...)), NAME_TAKEN or NO_ANONYMOUS; raises OSError with .stage."},
    {"sha256_hex", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(kasmina_sha256_hex)), METH_FASTCALL,
     "sha256_hex(chunks, portable=False)\n"
     "The SHA-256 of a tuple of buffers, as 64 hex digits (the CPU's SHA extensions where it has\n"
     "them; portable=True: the portable rounds, for tests)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "kasmina._fileio", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__fileio() {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "NAME_TAKEN", kNameTaken) != 0 ||
      PyModule_AddIntConstant(m, "NO_ANONYMOUS", kNoAnonymous) != 0 ||
      PyModule_AddObject(m, "SHA_NI", PyBool_FromLong(kasmina_sha256_uses_sha_ni())) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
