// The LSTM recurrence of msakit.modules.encoders._Recurrence, one compiled loop per direction
// (forward over t = 0..T-1, backward over t = T-1..0): per step one BLAS product and ONE fused
// elementwise pass over [B, H], with the Python interpreter and the per-op dispatch out of the
// loop. Built on first use by msakit/modules/lstm_kernel.py (torch.utils.cpp_extension).
//
// The B sequences of a batch are independent, so the rows are split into one range per torch
// thread (at::parallel_for, at least kMinRows rows each), and each range runs all T steps on its
// own thread with sequential products: no synchronisation between steps. Where at::parallel_for
// would run the ranges one after the other (built without OpenMP: lstm_kernel.py adds it where
// torch's own runtime is found), the batch is one range and MKL splits each product instead.
//
// Layout (all contiguous, float32 or float64, CPU; checked in lstm_kernel.py):
//   acts [T, B, 4H]: on entry the input gates (bias + W_ih x) in PyTorch's order i, f, g, o; on
//     return the activations sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) of the full gates.
//   w_hh [4H, H] row-major (nn.LSTM.weight_hh_l0). c_0 = h_0 = 0.
//   cells [T + 1, B, H] (cells[t + 1] = c_t), tanh_cells [T, B, H], hidden [T + 1, B, H].
// The gradient returned by `backward` is d(loss)/d(gates before activation) [T, B, 4H].
//
// Compiled with -O3 -ffast-math -mno-recip (and -mavx2 -mfma where the CPU has them) so that GCC
// calls glibc's vector exp and tanh (libmvec, <= 4 ulp) and divides exactly (its reciprocal
// estimate turned 1 / (1 + inf) into NaN); nothing here compares floats, so NaN and inf propagate
// as in plain arithmetic. -ffast-math is a compile flag only: the shared object is not linked
// with it (no flush-to-zero for the process).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

extern "C" {
// Fortran BLAS, exported by libtorch_cpu (MKL or OpenBLAS, whichever torch was built with).
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*);
// MKL's per-thread BLAS thread count (returns the previous one, 0 = the global setting); a weak
// reference: null where torch's BLAS is not MKL (the products then run as that BLAS decides).
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace {

// Per-step products below this many multiply-adds (B * H * 4H) run on the calling thread: MKL
// splits even TFN's (B = 32, H = 32: 131k) over 2 threads, and the synchronisation can cost more
// than the product (in one machine state the forward took 1.09 ms with 2 threads vs 0.63 ms with
// 1; in paired runs in others the saving was 0.02-0.1 ms a batch); LMF's (B = 64, H = 128: 4.2M)
// gain from the second thread (forward 8.8 vs 11.1 ms).
constexpr int64_t kSequentialBelow = int64_t(1) << 20;

// Fewest rows per thread when the batch is split. At B = 16, H = 32 on 2 threads the split
// measured 0.32 vs 0.43 ms forward + backward once and equal in a reviewer's reruns; fewer rows
// per range were not measured.
constexpr int64_t kMinRows = 8;

// Makes MKL run this thread's products sequentially for the object's lifetime when the per-step
// product of a [B, H] state with [H, 4H] weights is small. (Inside the row ranges' parallel region
// MKL runs sequentially anyway, its default MKL_DYNAMIC; forcing it there measured the same.)
class SequentialBlas {
 public:
  SequentialBlas(int64_t batch, int64_t hidden)
      : active_(batch * hidden * 4 * hidden < kSequentialBelow &&
                MKL_Set_Num_Threads_Local != nullptr) {
    if (active_) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

// Whether at::parallel_for runs its ranges on several threads in this build.
#if defined(_OPENMP) || AT_PARALLEL_NATIVE
constexpr bool kParallel = true;
#else
constexpr bool kParallel = false;
#endif

// How many row ranges the batch is split into: one per torch thread, at least kMinRows rows each
// (1 where the ranges would run one after the other: MKL then splits each product instead).
int64_t row_ranges(int64_t batch) {
  if (!kParallel) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch / kMinRows));
}

// work(begin, end) over row_ranges(batch) contiguous row ranges of [0, batch), in parallel.
template <typename Work>
void for_row_ranges(int64_t batch, const Work& work) {
  const int64_t ranges = row_ranges(batch);
  if (ranges == 1) {
    work(int64_t(0), batch);
    return;
  }
  at::parallel_for(0, ranges, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) work(batch * k / ranges, batch * (k + 1) / ranges);
  });
}

// For tests: the torch thread number (at::get_thread_num) that ran each row range of a batch of
// B, in row order.
std::vector<int64_t> range_threads(int64_t batch) {
  std::vector<int64_t> by_first_row(batch, -1);
  for_row_ranges(batch, [&](int64_t b0, int64_t) { by_first_row[b0] = at::get_thread_num(); });
  std::vector<int64_t> threads;
  for (int64_t thread : by_first_row) {
    if (thread >= 0) threads.push_back(thread);
  }
  return threads;
}

// C += op(A) op(B), column-major (BLAS) conventions.
void gemm_acc(char ta, char tb, int m, int n, int k, const float* a, int lda, const float* b,
              int ldb, float* c, int ldc) {
  const float one = 1.f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &one, c, &ldc);
}

void gemm_acc(char ta, char tb, int m, int n, int k, const double* a, int lda, const double* b,
              int ldb, double* c, int ldc) {
  const double one = 1.;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &one, c, &ldc);
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// One step forward over [B, H]: activations written over the gates, c_t, tanh(c_t), h_t.
template <typename T>
void cell_forward(T* __restrict acts, const T* __restrict c_prev, T* __restrict c_next,
                  T* __restrict tanh_c, T* __restrict h_next, int64_t batch, int64_t hidden) {
  for (int64_t b = 0; b < batch; ++b) {
    T* ai = acts + b * 4 * hidden;
    T* af = ai + hidden;
    T* ag = af + hidden;
    T* ao = ag + hidden;
    const T* cp = c_prev + b * hidden;
    T* cn = c_next + b * hidden;
    T* tc = tanh_c + b * hidden;
    T* hn = h_next + b * hidden;
#pragma GCC ivdep
    for (int64_t j = 0; j < hidden; ++j) {
      const T i = sigmoid(ai[j]), f = sigmoid(af[j]), g = std::tanh(ag[j]), o = sigmoid(ao[j]);
      const T c = f * cp[j] + i * g;
      const T t = std::tanh(c);
      ai[j] = i;
      af[j] = f;
      ag[j] = g;
      ao[j] = o;
      cn[j] = c;
      tc[j] = t;
      hn[j] = o * t;
    }
  }
}

// One step backward over [B, H]: dh = dL/dh_t (all paths), dc = dL/dc_t from step t + 1 (already
// multiplied by f_{t+1}); writes the gate gradients of step t and leaves dc * f_t in dc.
template <typename T>
void cell_backward(const T* __restrict acts, const T* __restrict c_prev, const T* __restrict tanh_c,
                   const T* __restrict dh, T* __restrict dc, T* __restrict dgates, int64_t batch,
                   int64_t hidden) {
  for (int64_t b = 0; b < batch; ++b) {
    const T* ai = acts + b * 4 * hidden;
    const T* af = ai + hidden;
    const T* ag = af + hidden;
    const T* ao = ag + hidden;
    const T* cp = c_prev + b * hidden;
    const T* tc = tanh_c + b * hidden;
    const T* dhb = dh + b * hidden;
    T* dcb = dc + b * hidden;
    T* di = dgates + b * 4 * hidden;
    T* df = di + hidden;
    T* dg = df + hidden;
    T* d_o = dg + hidden;
#pragma GCC ivdep
    for (int64_t j = 0; j < hidden; ++j) {
      const T i = ai[j], f = af[j], g = ag[j], o = ao[j], t = tc[j], x = dhb[j];
      const T c = dcb[j] + x * o * (T(1) - t * t);  // dL/dc_t
      di[j] = c * g * i * (T(1) - i);
      df[j] = c * cp[j] * f * (T(1) - f);
      dg[j] = c * i * (T(1) - g * g);
      d_o[j] = x * t * o * (T(1) - o);
      dcb[j] = c * f;
    }
  }
}

void check(const torch::Tensor& acts, const torch::Tensor& w_hh) {
  TORCH_CHECK(acts.dim() == 3 && acts.size(2) % 4 == 0 && acts.is_contiguous() && acts.is_cpu(),
              "lstm_kernel: acts must be a contiguous CPU [T, B, 4H] tensor");
  const int64_t h = acts.size(2) / 4;
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * h && w_hh.size(1) == h &&
                  w_hh.is_contiguous() && w_hh.scalar_type() == acts.scalar_type(),
              "lstm_kernel: w_hh must be a contiguous [4H, H] tensor of acts' dtype");
  TORCH_CHECK(acts.size(1) * 4 * h < (int64_t(1) << 31), "lstm_kernel: B * 4H must fit in int");
}

std::vector<torch::Tensor> forward(torch::Tensor acts, torch::Tensor w_hh) {
  check(acts, w_hh);
  const int64_t steps = acts.size(0), batch = acts.size(1), hidden = acts.size(2) / 4;
  auto cells = torch::zeros({steps + 1, batch, hidden}, acts.options());
  auto tanh_cells = torch::empty({steps, batch, hidden}, acts.options());
  auto states = torch::zeros({steps + 1, batch, hidden}, acts.options());
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_kernel_forward", [&] {
    pybind11::gil_scoped_release no_gil;
    scalar_t* a = acts.data_ptr<scalar_t>();
    const scalar_t* w = w_hh.data_ptr<scalar_t>();
    scalar_t* c = cells.data_ptr<scalar_t>();
    scalar_t* tc = tanh_cells.data_ptr<scalar_t>();
    scalar_t* h = states.data_ptr<scalar_t>();
    const int64_t bh = batch * hidden, g = 4 * hidden;
    for_row_ranges(batch, [&](int64_t b0, int64_t b1) {
      SequentialBlas sequential(b1 - b0, hidden);
      const int64_t rows = b1 - b0, r0 = b0 * hidden;
      for (int64_t t = 0; t < steps; ++t) {
        scalar_t* a_t = a + (t * batch + b0) * g;
        if (t) {  // gates_t [rows, 4H] += h_{t-1} [rows, H] @ w_hh^T (h_0 = 0)
          gemm_acc('T', 'N', g, rows, hidden, w, hidden, h + t * bh + r0, hidden, a_t, g);
        }
        cell_forward<scalar_t>(a_t, c + t * bh + r0, c + (t + 1) * bh + r0, tc + t * bh + r0,
                               h + (t + 1) * bh + r0, rows, hidden);
      }
    });
  });
  return {cells, tanh_cells, states};
}

torch::Tensor backward(torch::Tensor grad_hidden, torch::Tensor acts, torch::Tensor cells,
                       torch::Tensor tanh_cells, torch::Tensor w_hh) {
  check(acts, w_hh);
  const int64_t steps = acts.size(0), batch = acts.size(1), hidden = acts.size(2) / 4;
  TORCH_CHECK(steps > 0, "lstm_kernel: backward needs T >= 1");
  for (const auto* state : {&grad_hidden, &tanh_cells, &cells}) {
    const int64_t rows = state == &cells ? steps + 1 : steps;
    TORCH_CHECK(state->is_contiguous() && state->is_cpu() && state->scalar_type() == acts.scalar_type() &&
                    state->sizes() == torch::IntArrayRef({rows, batch, hidden}),
                "lstm_kernel: grad_hidden and tanh_cells must be [T, B, H], cells [T + 1, B, H], "
                "contiguous CPU tensors of acts' dtype");
  }
  auto dgates = torch::empty_like(acts);
  auto dh = grad_hidden[steps - 1].clone();
  auto dc = torch::zeros_like(dh);
  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "lstm_kernel_backward", [&] {
    pybind11::gil_scoped_release no_gil;
    const scalar_t* a = acts.data_ptr<scalar_t>();
    const scalar_t* w = w_hh.data_ptr<scalar_t>();
    const scalar_t* c = cells.data_ptr<scalar_t>();
    const scalar_t* tc = tanh_cells.data_ptr<scalar_t>();
    const scalar_t* gh = grad_hidden.data_ptr<scalar_t>();
    scalar_t* d = dgates.data_ptr<scalar_t>();
    scalar_t* dh_p = dh.data_ptr<scalar_t>();
    scalar_t* dc_p = dc.data_ptr<scalar_t>();
    const int64_t bh = batch * hidden, g = 4 * hidden;
    for_row_ranges(batch, [&](int64_t b0, int64_t b1) {
      SequentialBlas sequential(b1 - b0, hidden);
      const int64_t rows = b1 - b0, r0 = b0 * hidden;
      for (int64_t t = steps - 1; t >= 0; --t) {
        scalar_t* d_t = d + (t * batch + b0) * g;
        cell_backward<scalar_t>(a + (t * batch + b0) * g, c + t * bh + r0, tc + t * bh + r0,
                                dh_p + r0, dc_p + r0, d_t, rows, hidden);
        if (t) {  // dh_{t-1} = grad_hidden[t-1] + dgates_t [rows, 4H] @ w_hh [4H, H]
          const scalar_t* gh_t = gh + (t - 1) * bh + r0;
          std::copy(gh_t, gh_t + rows * hidden, dh_p + r0);
          gemm_acc('N', 'N', hidden, rows, g, w, hidden, d_t, g, dh_p + r0, hidden);
        }
      }
    });
  });
  return dgates;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_ranges", &row_ranges,
        "how many row ranges a batch of B is split into (1 = not split; called inside another "
        "parallel region, the ranges run one after the other)");
  m.def("range_threads", &range_threads, "the torch thread number that ran each row range (tests)");
  m.attr("parallel") = kParallel;
  m.def("forward", &forward, "LSTM recurrence forward: acts (in place), w_hh -> cells, tanh_cells, hidden");
  m.def("backward", &backward, "LSTM recurrence backward -> gradient of the gate pre-activations");
}
