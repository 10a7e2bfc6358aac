// Asking for a call's tensors before it reads them (the one-token ops: q4.cpp, q4_branch.cpp, linear.cpp).
// A decoded token streams the whole model through the caches, so each op call finds the tensors it was
// handed cold: their headers (TensorImpl), their storages (StorageImpl: the data pointer) and small data
// such as an adapter's scale vectors. Read one after the other — a check here, a data pointer there —
// each is a miss of its own, on the serial path before the op's parallel loop (docs/kernels.md: ~1.3 us a
// LoRDBA branch prepared cold against ~0.4 us warm). warm_tensors asks for all of them at once, in three
// rounds (headers; storages; data), so that their misses overlap.
//
// And before the call starts: a decode step makes its adapted one-token calls in the same order every
// token, so each such call remembers (per calling thread) the lines it asked for, its adapter's signs and
// output scales, and which call came after it last time (Site, enter). Its parallel loop's calling thread,
// once its own rows are done and while it waits for the other threads, asks for the next call's lines
// (ahead): that call then finds them in its core's L2. A stale line (a tensor freed or moved since) is
// only a prefetch of an address nothing reads; nothing but prefetches is done with the recorded lines.
// Plain layers take no part (enter(nullptr)): measured, looking ahead did not pay for them.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <unordered_map>
#include <utility>

namespace lordba_warm {

// A list of tensors and how many bytes of each one's data to ask for (0: header and storage only).
struct Part {
  at::TensorList tensors;
  int64_t data_bytes = 0;
};

constexpr int kHeaderBytes = 256;  // a TensorImpl's fields that checks and data pointers read (its first lines)
// Of an adapter's scale vectors b and m, which RowBranch::prepare reads whole before the parallel loop.
constexpr int64_t kScaleBytes = 8192;

// An adapted one-token call as the calling thread saw it last time: the lines warm_tensors asked for and
// remember() recorded (the first kSiteLines), how many RowBranch slots it prepared, and the call that came
// next. One block of memory, so that its lines come in one stream.
constexpr int kSiteLines = 500;

struct Site {
  const void* key = nullptr;
  Site* next = nullptr;
  int64_t slots = 0;
  int count = 0;
  const char* lines[kSiteLines];

  void add(const void* line) {
    if (count < kSiteLines) lines[count++] = static_cast<const char*>(line);
  }
};

constexpr size_t kMaxSites = 2048;  // more call sites than that (models loaded and dropped): start again

// The site entered for the call this thread is making (null: none), until the call's loop takes it.
inline Site*& current() {
  thread_local Site* site = nullptr;
  return site;
}

// The calling thread's site for the call keyed `key` (its first weight's TensorImpl: no read), linked as the
// next of the site entered before it, its lines cleared for warm_tensors to record; it becomes current().
// key null: none (current() cleared), for a call that takes no part.
inline Site* enter(const void* key, int64_t slots) {
  if (key == nullptr) return current() = nullptr;  // a call that takes no part (a plain layer's)
  struct Chain {
    std::unordered_map<const void*, std::unique_ptr<Site>> sites;
    Site* last = nullptr;
  };
  thread_local Chain chain;
  Site* s = chain.last != nullptr ? chain.last->next : nullptr;
  if (s == nullptr || s->key != key) {
    if (chain.sites.size() >= kMaxSites) {
      chain.sites.clear();
      chain.last = nullptr;
    }
    std::unique_ptr<Site>& kept = chain.sites[key];
    if (!kept) {
      kept = std::make_unique<Site>();
      kept->key = key;
    }
    s = kept.get();
    if (chain.last != nullptr) chain.last->next = s;
  }
  chain.last = s;
  s->slots = slots;
  s->count = 0;
  if (s->next != nullptr)  // its first lines, for ahead() at this call's end
    for (int k = 0; k < 256; k += 64) __builtin_prefetch(reinterpret_cast<const char*>(s->next) + k, 0, 2);
  current() = s;
  return s;
}

// A tag of the calling thread (the address of a thread-local), to tell it from a parallel loop's others.
inline const void* this_thread() {
  thread_local char tag = 0;
  return &tag;
}

// The site entered for this call, taken (null after) by the call's parallel loop.
inline Site* take_site() { return std::exchange(current(), nullptr); }

// Asks for the lines of the call that came after `site` last time (L2, no wait); returns that call's site.
inline const Site* ahead(const Site* site) {
  const Site* next = site != nullptr ? site->next : nullptr;
  if (next == nullptr) return nullptr;
  for (int i = 0; i < next->count; ++i) __builtin_prefetch(next->lines[i], 0, 2);
  return next;
}

// Calls f(line) for each 64-byte step of the first `bytes` of t's data (at most all of it); nothing for an
// undefined tensor or one without storage or data. Reads only the header and the storage.
template <typename F>
inline void each_data_line(const at::Tensor& t, int64_t bytes, const F& f) {
  if (!t.defined() || bytes <= 0) return;
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
  if (storage == nullptr || storage->data() == nullptr) return;
  const char* data = static_cast<const char*>(storage->data()) + impl->storage_offset() * impl->itemsize();
  const int64_t n = std::min<int64_t>(bytes, impl->numel() * static_cast<int64_t>(impl->itemsize()));
  for (int64_t k = 0; k < n; k += 64) f(data + k);
}

// Records (without asking for them now) the first `bytes` of each tensor's data in `site`, for ahead(): data
// the call reads inside its loop, such as an adapter's signs, which its threads fetch as they go.
inline void remember(at::TensorList tensors, int64_t bytes, Site* site) {
  for (const at::Tensor& t : tensors) each_data_line(t, bytes, [site](const char* line) { site->add(line); });
}

// Prefetches (never faults, never waits for the lines) every tensor's header, storage and first data_bytes
// of data, recording the lines in `site` where given. Undefined tensors and tensors without storage are passed over.
inline void warm_tensors(std::initializer_list<Part> parts, Site* site = nullptr) {
  auto ask = [site](const void* line) {
    __builtin_prefetch(line, 0, 3);
    if (site != nullptr) site->add(line);
  };
  for (const Part& part : parts)
    for (const at::Tensor& t : part.tensors) {
      const char* impl = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
      for (int k = 0; k < kHeaderBytes; k += 64) ask(impl + k);
    }
  for (const Part& part : parts)
    for (const at::Tensor& t : part.tensors)
      if (t.defined()) ask(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
  for (const Part& part : parts)
    for (const at::Tensor& t : part.tensors) each_data_line(t, part.data_bytes, ask);
}

}  // namespace lordba_warm
