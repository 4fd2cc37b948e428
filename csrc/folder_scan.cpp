// kasmina::scan_folder: one listing of a checkpoint folder for the checkpoint index
// (kasmina/checkpoint_index.py). Listing 10,000 checkpoints means 20,000 names; a Python
// loop over os.scandir costs more than the kernel's readdir itself, so the names, the
// sidecars' inodes and the tidiness check come from one pass here. The Python fallback
// (scan_folder_python) does the same and tests/test_checkpoint_index.py checks they agree.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#if !defined(_WIN32)
#include <dirent.h>
#endif

namespace kasmina {
namespace {

// Must match TEMP_PREFIX in kasmina/durable_io.py (the fallback and the test use that one).
constexpr std::string_view kTempPrefix = ".kasmina-tmp-";

bool ends_with(std::string_view name, std::string_view suffix) {
  return name.size() >= suffix.size() && name.substr(name.size() - suffix.size()) == suffix;
}

bool is_sidecar(std::string_view name) { return !name.empty() && name.front() != '.' && ends_with(name, ".json"); }

bool is_payload(std::string_view name) { return ends_with(name, ".safetensors") || ends_with(name, ".pt"); }

// A payload's name without ".safetensors" or ".pt".
std::string_view payload_stem(std::string_view name) {
  return name.substr(0, name.size() - (ends_with(name, ".pt") ? 3 : 12));
}

uint64_t fnv1a(std::string_view text) {
  uint64_t hash = 14695981039346656037ull;
  for (const unsigned char c : text) hash = (hash ^ c) * 1099511628211ull;
  return hash;
}

// No temp files, and exactly one payload per sidecar and a sidecar for every payload:
// as many payloads as sidecars, no two payloads of one stem, and each sidecar's stem
// among the payloads' (an open-addressing set: 10,000 entries in a couple of ms).
bool is_tidy(const std::vector<std::string_view>& names, const std::vector<std::string_view>& sidecars) {
  std::vector<std::string_view> stems;
  stems.reserve(sidecars.size());
  for (std::string_view name : names) {
    if (name.substr(0, kTempPrefix.size()) == kTempPrefix) return false;
    if (is_payload(name)) stems.push_back(payload_stem(name));
  }
  if (stems.size() != sidecars.size()) return false;
  size_t capacity = 16;
  while (capacity < 2 * stems.size()) capacity *= 2;
  std::vector<std::string_view> table(capacity);
  std::vector<bool> used(capacity, false);
  const auto slot = [&](std::string_view stem) {  // where stem is, or the free slot it would take
    size_t i = fnv1a(stem) & (capacity - 1);
    while (used[i] && table[i] != stem) i = (i + 1) & (capacity - 1);
    return i;
  };
  for (std::string_view stem : stems) {
    const size_t i = slot(stem);
    if (used[i]) return false;  // two payloads of one checkpoint
    used[i] = true;
    table[i] = stem;
  }
  for (std::string_view sidecar : sidecars) {
    if (!used[slot(sidecar.substr(0, sidecar.size() - 5))]) return false;
  }
  return true;
}

at::Tensor bytes_tensor(const std::string& text) {
  at::Tensor out = at::empty({static_cast<int64_t>(text.size())}, at::TensorOptions().dtype(at::kByte));
  if (!text.empty()) std::memcpy(out.data_ptr<uint8_t>(), text.data(), text.size());
  return out;
}

// (every name as "/a/b/.../", the sidecar names likewise, the sidecars' inodes in that
// order, 1 if tidy else 0, errno: 0, or why the folder could not be listed)
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t> scan_folder(const std::string& path) {
  std::string joined = "/";
  std::string sidecar_joined = "/";
  std::vector<int64_t> inodes;
  int64_t error = 0;
#if defined(_WIN32)
  error = ENOSYS;
#else
  DIR* dir = opendir(path.c_str());
  if (dir == nullptr) {
    error = errno;
  } else {
    while (true) {
      errno = 0;
      const dirent* entry = readdir(dir);
      if (entry == nullptr) {
        error = errno;
        break;
      }
      const std::string_view name(entry->d_name);
      if (name == "." || name == "..") continue;
      joined.append(name).push_back('/');
      if (is_sidecar(name)) {
        sidecar_joined.append(name).push_back('/');
        inodes.push_back(static_cast<int64_t>(entry->d_ino));
      }
    }
    closedir(dir);
  }
#endif
  if (error != 0) {
    joined = sidecar_joined = "/";
    inodes.clear();
  }
  std::vector<std::string_view> names, sidecars;
  for (const auto& [text, out] : {std::pair{&joined, &names}, std::pair{&sidecar_joined, &sidecars}}) {
    std::string_view rest(*text);
    for (size_t start = 1, end; start < rest.size(); start = end + 1) {
      end = rest.find('/', start);
      out->push_back(rest.substr(start, end - start));
    }
  }
  at::Tensor inode_tensor = at::empty({static_cast<int64_t>(inodes.size())}, at::TensorOptions().dtype(at::kLong));
  if (!inodes.empty()) std::memcpy(inode_tensor.data_ptr<int64_t>(), inodes.data(), inodes.size() * sizeof(int64_t));
  const int64_t tidy = error == 0 && is_tidy(names, sidecars) ? 1 : 0;
  return {bytes_tensor(joined), bytes_tensor(sidecar_joined), inode_tensor, tidy, error};
}

}  // namespace

TORCH_LIBRARY_IMPL(kasmina, CompositeImplicitAutograd, m) { m.impl("scan_folder", &scan_folder); }

}  // namespace kasmina
