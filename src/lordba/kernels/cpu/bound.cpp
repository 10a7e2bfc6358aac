// Kept kernel calls with their arguments bound (lordba.kernels.cpu.bound): a small Python extension beside the
// kernels' library. Eager decode calls ~210 layers a token, and a call through torch.ops parses every argument
// from Python (q4_branch has 20) where the kernel itself takes a few microseconds: a bound call takes the input
// alone, checks in C++ that nothing it was bound to changed, and calls the op through the dispatcher's typed
// handle (so dispatch modes, tracing and profiling see the op as they see torch.ops' call). Any check that
// fails returns None and the caller takes its ordinary path: these are shortcuts, never another result.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Dtype.h>
#include <torch/extension.h>

#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Opt = c10::optional<at::Tensor>;
using Q4LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              int64_t, int64_t, bool, bool);
using Q4BranchFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              int64_t, int64_t, bool, bool, const Opt&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, const Opt&,
                              const Opt&, const Opt&);
using LinearBranchFn = at::Tensor(const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                  int64_t, const Opt&, const Opt&);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// A dict entry the call was bound to (a module's buffer, parameter or attribute), looked up again on every
// call and compared by identity: a tensor replaced (`.to()`, `load_state_dict(assign=True)`, a new compute)
// makes the call decline.
struct Held {
  py::dict dict;
  py::str key;
  py::object value;  // None: absent or None
  bool same() const {
    PyObject* now = PyDict_GetItemWithError(dict.ptr(), key.ptr());  // borrowed
    if (now == nullptr) {
      PyErr_Clear();
      now = Py_None;
    }
    return now == value.ptr();
  }
};

Held held(const py::dict& dict, const char* key) {
  py::str name(key);
  py::object value = dict.contains(name) ? py::reinterpret_borrow<py::object>(dict[name]) : py::none();
  return {dict, name, value};
}

at::Tensor tensor_of(const py::handle& obj) {
  TORCH_CHECK(THPVariable_Check(obj.ptr()), "lordba bound call: expected a tensor");
  return THPVariable_Unpack(obj.ptr());
}

Opt optional_of(const py::handle& obj) { return obj.is_none() ? Opt() : Opt(tensor_of(obj)); }

// An input the op may take straight away: a plain tensor (no subclass, no __torch_function__ mode: those go
// through torch.ops' Python handling), on the CPU, where no gradient is recorded.
const at::Tensor* plain_input(const py::handle& x) {
  if (!THPVariable_CheckExact(x.ptr()) || at::impl::torch_function_mode_enabled()) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(x.ptr());
  if (!t.defined() || !t.device().is_cpu() || (at::GradMode::is_enabled() && t.requires_grad())) return nullptr;
  return &t;
}

py::object wrap(at::Tensor y) { return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(y))); }

// A q4 layer's own forward (Q4Linear without an adapter): q4_linear, then the bias as Q4Linear adds it.
class Q4Call {
 public:
  Q4Call(const py::dict& buffers, const py::dict& params, int64_t in, int64_t gemm_min, int64_t bits,
         const py::tuple& flags)
      : held_{held(buffers, "qweight"), held(buffers, "scale"), held(buffers, "minus"), held(params, "bias")},
        flags_(flags),
        max_numel_(gemm_min * in),
        in_(in),
        gemm_min_(gemm_min),
        bits_(bits),
        bf16_(flags[0].cast<bool>()),
        int8_dot_(flags[1].cast<bool>()),
        op_(op_handle<Q4LinearFn>("lordba::q4_linear")) {
    qweight_ = tensor_of(held_[0].value);
    scale_ = tensor_of(held_[1].value);
    minus_ = tensor_of(held_[2].value);
    bias_ = optional_of(held_[3].value);
  }

  // `flags`: the layer's compute flags now (the call declines if they are not those it was bound with).
  py::object call(const py::handle& x, const py::handle& flags) const {
    const at::Tensor* t = flags.ptr() == flags_.ptr() ? plain_input(x) : nullptr;
    if (t == nullptr || t->numel() >= max_numel_) return py::none();  // a prompt (the GEMM): the Python call
    for (const auto& h : held_)
      if (!h.same()) return py::none();
    at::Tensor y;
    {
      py::gil_scoped_release released;
      y = op_.call(*t, qweight_, scale_, minus_, in_, gemm_min_, bits_, bf16_, int8_dot_);
      if (bias_.has_value()) y = y + bias_->to(y.scalar_type());
    }
    return wrap(std::move(y));
  }

 private:
  std::vector<Held> held_;
  py::object flags_;
  int64_t max_numel_;
  at::Tensor qweight_, scale_, minus_;
  Opt bias_;
  int64_t in_, gemm_min_, bits_;
  bool bf16_, int8_dot_;
  c10::TypedOperatorHandle<Q4LinearFn> op_;
};

// An adapted layer's kept call (lordba.nn.fastpath): the base layer and one adapter's branch in one op
// (q4_branch, linear_branch; a prompt through the Python call, `python_`) or the Python call, taken while the model call's token, the adapters' epoch, the
// input's dtype, grad mode, the hooks and the base layer's tensors are those it was made for.
class LayerCall {
 public:
  enum class Kind { q4, linear, python };

  // `checks`: (token, epoch list, epoch, dtype, hook dicts), as lordba.nn.fastpath._layer_call gives them; `held`:
  // (dict, key) pairs looked up again on every call; `fallback`: the layer's Python call.
  LayerCall(Kind kind, const py::tuple& checks, const py::list& held_entries, int64_t max_numel, py::object fallback)
      : kind_(kind),
        token_(checks[0]),
        epoch_list_(checks[1].cast<py::list>()),
        epoch_(checks[2].cast<int64_t>()),
        max_numel_(max_numel),
        python_(std::move(fallback)) {
    TORCH_CHECK(checks.size() == 5 && epoch_list_.size() == 1, "lordba bound call: bad checks");
    TORCH_CHECK(THPDtype_Check(checks[3].ptr()), "lordba bound call: dtype must be a torch.dtype");
    dtype_ = reinterpret_cast<THPDtype*>(checks[3].ptr())->scalar_type;
    for (auto h : checks[4]) hooks_.push_back(py::reinterpret_borrow<py::dict>(h));
    for (auto entry : held_entries) {
      auto pair = entry.cast<py::tuple>();
      held_.push_back(held(pair[0].cast<py::dict>(), pair[1].cast<std::string>().c_str()));
    }
  }

  static LayerCall q4(const py::tuple& checks, const py::dict& buffers, const py::dict& params, const py::dict& attrs,
                      int64_t in, int64_t gemm_min, int64_t bits, const py::tuple& adapter, double scaling,
                      int64_t limit, int64_t max_numel, py::object fallback) {
    py::list entries;
    for (const char* key : {"qweight", "scale", "minus"}) entries.append(py::make_tuple(buffers, key));
    entries.append(py::make_tuple(params, "bias"));
    entries.append(py::make_tuple(attrs, "_flags"));
    LayerCall call(Kind::q4, checks, entries, max_numel, std::move(fallback));
    call.base_ = {tensor_of(call.held_[0].value), tensor_of(call.held_[1].value), tensor_of(call.held_[2].value)};
    call.bias_ = optional_of(call.held_[3].value);
    auto flags = call.held_[4].value.cast<py::tuple>();
    call.bf16_ = flags[0].cast<bool>();
    call.int8_dot_ = flags[1].cast<bool>();
    call.in_ = in;
    call.gemm_min_ = gemm_min;
    call.bits_ = bits;
    call.set_adapter(adapter, scaling, limit);
    call.q4_op_ = op_handle<Q4BranchFn>("lordba::q4_branch");
    return call;
  }

  static LayerCall linear(const py::tuple& checks, const py::dict& params, const py::tuple& adapter, double scaling,
                          int64_t limit, int64_t max_numel, py::object fallback) {
    py::list entries;
    entries.append(py::make_tuple(params, "weight"));
    entries.append(py::make_tuple(params, "bias"));
    LayerCall call(Kind::linear, checks, entries, max_numel, std::move(fallback));
    call.base_ = {tensor_of(call.held_[0].value)};
    call.bias_ = optional_of(call.held_[1].value);
    call.set_adapter(adapter, scaling, limit);
    call.linear_op_ = op_handle<LinearBranchFn>("lordba::linear_branch");
    return call;
  }

  static LayerCall python(const py::tuple& checks, py::object fallback) {
    return LayerCall(Kind::python, checks, py::list(), 0, std::move(fallback));
  }

  // `token`: the calling thread's armed token now (lordba.nn.fastpath.ARMED).
  py::object call(const py::handle& x, const py::handle& token) const {
    if (token.ptr() != token_.ptr() || token.is_none()) return py::none();
    PyObject* epoch = PyList_GET_ITEM(epoch_list_.ptr(), 0);  // the list always has its one item
    if (PyLong_AsLongLong(epoch) != epoch_ || at::GradMode::is_enabled()) {
      PyErr_Clear();
      return py::none();
    }
    for (const auto& hooks : hooks_)
      if (PyDict_GET_SIZE(hooks.ptr()) != 0) return py::none();
    for (const auto& h : held_)
      if (!h.same()) return py::none();
    if (kind_ == Kind::python) {
      if (!THPVariable_CheckExact(x.ptr()) || THPVariable_Unpack(x.ptr()).scalar_type() != dtype_) return py::none();
      return python_(x);
    }
    const at::Tensor* t = plain_input(x);
    if (t == nullptr || t->scalar_type() != dtype_) return py::none();
    // a prompt from max_numel elements on: q4's bfloat16 GEMM takes kept prefill factors, linear_branch the tile
    // unit's, which the Python call makes and keeps (everything else checked: that call is the layer's call)
    if (t->numel() >= max_numel_ && (kind_ == Kind::linear || bf16_)) return python_(x);
    at::Tensor y;
    {
      py::gil_scoped_release released;
      const auto& A = adapter_;
      if (kind_ == Kind::q4)
        y = q4_op_->call(*t, base_[0], base_[1], base_[2], in_, gemm_min_, bits_, bf16_, int8_dot_, bias_, A[0], A[1],
                         A[2], A[3], A[4], scaling_, limit_, c10::nullopt, c10::nullopt, c10::nullopt);
      else
        y = linear_op_->call(*t, base_[0], bias_, A[0], A[1], A[2], A[3], A[4], scaling_, limit_, c10::nullopt,
                             c10::nullopt);
    }
    return wrap(std::move(y));
  }

 private:
  void set_adapter(const py::tuple& adapter, double scaling, int64_t limit) {
    TORCH_CHECK(adapter.size() == 5, "lordba bound call: an adapter is (sign_A, sign_B, b, m, a)");
    for (auto t : adapter) adapter_.push_back(tensor_of(t));
    scaling_ = scaling;
    limit_ = limit;
  }

  Kind kind_;
  py::object token_;
  py::list epoch_list_;
  int64_t epoch_;
  c10::ScalarType dtype_ = c10::ScalarType::Float;
  std::vector<py::dict> hooks_;
  std::vector<Held> held_;
  int64_t max_numel_;
  std::vector<at::Tensor> base_, adapter_;
  Opt bias_;
  int64_t in_ = 0, gemm_min_ = 0, bits_ = 0, limit_ = 0;
  bool bf16_ = false, int8_dot_ = false;
  double scaling_ = 1.0;
  c10::optional<c10::TypedOperatorHandle<Q4BranchFn>> q4_op_;
  c10::optional<c10::TypedOperatorHandle<LinearBranchFn>> linear_op_;
  py::object python_;
};

// A copy of a module (deepcopy, pickle) gets no kept call: it makes its own on its first call.
template <typename T>
void dropped_on_copy(py::class_<T>& cls) {
  cls.def("__deepcopy__", [](const T&, const py::object&) { return py::none(); })
      .def("__copy__", [](const T&) { return py::none(); })
      .def("__reduce__", [](const T&) { return py::make_tuple(py::type::of(py::none()), py::tuple()); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lordba's bound kernel calls (kept between tokens by eager decode)";
  py::class_<Q4Call> q4(m, "Q4Call");
  q4.def(py::init<const py::dict&, const py::dict&, int64_t, int64_t, int64_t, const py::tuple&>())
      .def("__call__", &Q4Call::call);
  dropped_on_copy(q4);
  py::class_<LayerCall> layer(m, "LayerCall");
  layer.def_static("q4", &LayerCall::q4)
      .def_static("linear", &LayerCall::linear)
      .def_static("python", &LayerCall::python)
      .def("__call__", &LayerCall::call);
  dropped_on_copy(layer);
}
