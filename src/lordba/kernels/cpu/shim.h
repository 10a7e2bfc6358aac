// C entry points for AOTInductor (lordba.nn.aot): a package compiled with these declared
// (aot_inductor.custom_ops_to_c_shims, lordba.kernels.cpu.aoti) calls aoti_torch_cpu_<op> directly
// instead of through its proxy executor, which builds a boxed argument stack (and copies the op's
// schema) on every call: ~1-2 us an op call with q4_branch's 20 arguments, 210 calls a decoded token.
// Each op's shim sits beside its registration; the types follow AOTInductor's C shim ABI (tensors as
// AtenTensorHandle, optional ones as AtenTensorHandle* that may be null, bool as int32_t, the result
// through AtenTensorHandle*); an exception becomes AOTI_TORCH_FAILURE, as in torch's own shims.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/MaybeOwned.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#include <cstdint>
#include <optional>
#include <utility>

#define LORDBA_SHIM extern "C" __attribute__((visibility("default"))) AOTITorchError

namespace lordba_shim {

inline const at::Tensor& tensor(AtenTensorHandle h) { return *torch::aot_inductor::tensor_handle_to_tensor_pointer(h); }

inline std::optional<at::Tensor> optional(AtenTensorHandle* h) {
  return h ? std::make_optional(tensor(*h)) : std::nullopt;
}

// A C list (AOTInductor passes Tensor[] as handles and a length) as the op's at::TensorList, the tensors
// borrowed for the call (the caller holds them): no reference count is touched, no heap used up to 4.
class BorrowedList {
 public:
  BorrowedList(const AtenTensorHandle* hs, int64_t n) {
    ts_.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) ts_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(tensor(hs[i])));
  }
  ~BorrowedList() {
    for (at::Tensor& t : ts_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  BorrowedList(const BorrowedList&) = delete;
  BorrowedList& operator=(const BorrowedList&) = delete;
  operator at::TensorList() const { return at::TensorList(ts_.data(), ts_.size()); }

 private:
  c10::SmallVector<at::Tensor, 4> ts_;
};

inline void result(at::Tensor&& t, AtenTensorHandle* ret) { *ret = torch::aot_inductor::new_tensor_handle(std::move(t)); }

}  // namespace lordba_shim
