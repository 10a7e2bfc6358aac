// Asking for a call's tensors before it reads them (the one-token ops: q4.cpp, q4_branch.cpp, linear.cpp).
// A decoded token streams the whole model through the caches, so each op call finds the tensors it was
// handed cold: their headers (TensorImpl), their storages (StorageImpl: the data pointer) and small data
// such as an adapter's scale vectors. Read one after the other — a check here, a data pointer there —
// each is a miss of its own, on the serial path before the op's parallel loop (docs/kernels.md: ~1.3 us a
// LoRDBA branch prepared cold against ~0.4 us warm). warm_tensors asks for all of them at once, in three
// rounds (headers; storages; data), so that their misses overlap.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace lordba_warm {

// A list of tensors and how many bytes of each one's data to ask for (0: header and storage only).
struct Part {
  at::TensorList tensors;
  int64_t data_bytes = 0;
};

constexpr int kHeaderBytes = 256;  // a TensorImpl's fields that checks and data pointers read (its first lines)
// Of an adapter's scale vectors b and m, which RowBranch::prepare reads whole before the parallel loop.
constexpr int64_t kScaleBytes = 8192;

// Prefetches (never faults, never waits for the lines) every tensor's header, storage and first data_bytes
// of data. Undefined tensors and tensors without storage are passed over.
inline void warm_tensors(std::initializer_list<Part> parts) {
  for (const Part& part : parts)
    for (const at::Tensor& t : part.tensors) {
      const char* impl = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
      for (int k = 0; k < kHeaderBytes; k += 64) __builtin_prefetch(impl + k, 0, 3);
    }
  for (const Part& part : parts)
    for (const at::Tensor& t : part.tensors)
      if (t.defined()) __builtin_prefetch(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl(), 0, 3);
  for (const Part& part : parts) {
    if (part.data_bytes <= 0) continue;
    for (const at::Tensor& t : part.tensors) {
      if (!t.defined()) continue;
      const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
      const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl();
      if (storage == nullptr || storage->data() == nullptr) continue;
      const char* data = static_cast<const char*>(storage->data()) + impl->storage_offset() * impl->itemsize();
      const int64_t n = std::min<int64_t>(part.data_bytes, impl->numel() * static_cast<int64_t>(impl->itemsize()));
      for (int64_t k = 0; k < n; k += 64) __builtin_prefetch(data + k, 0, 3);
    }
  }
}

}  // namespace lordba_warm
