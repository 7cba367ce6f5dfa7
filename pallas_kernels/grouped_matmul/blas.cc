// Exact grouped matmul for XLA:CPU, as two XLA FFI handlers (loaded by blas.py).
//
//   m1_jax_gmm:  out[rows of g] = lhs[rows of g] @ rhs[g]  (rhs[g]^T when trans_rhs); rows past the groups = 0
//   m1_jax_tgmm: out[g] = lhs[rows of g]^T @ rhs[rows of g]  (0 for an empty group)
//
// Rows are grouped as in lax.ragged_dot: group g owns the group_sizes[g] rows after the rows of groups < g.
// Each group's product is split into column blocks, and the blocks run as sgemm calls on the calling thread and
// XLA's own intra-op thread pool; the BLAS must be single-threaded (blas.py loads a private copy of
// OpenBLAS set to one thread). BLAS's own threads would compete with XLA's for the same cores (measured: a slower
// train step than the pure-JAX path); sharing XLA's pool keeps one thread per core.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm of an ILP64 BLAS (64-bit integer arguments).
using SgemmFn = void (*)(int order, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

SgemmFn sgemm = nullptr;

// Work items 0..n-1 shared by the calling thread and pool helpers. Held by shared_ptr: a helper the pool starts
// after every item is done still finds it alive.
struct WorkQueue {
  std::function<void(int64_t)> item;
  int64_t n = 0;
  std::atomic<int64_t> next{0}, done{0};

  void Drain() {
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      item(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs item(i) for i in [0, n) on this thread and up to num_threads - 1 pool threads. The caller never waits for a
// helper to start (it takes every item no helper has taken), only for items already running, so a busy pool
// cannot deadlock it.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> item) {
  auto queue = std::make_shared<WorkQueue>();
  queue->item = std::move(item);
  queue->n = n;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([queue] { queue->Drain(); });
  queue->Drain();
  while (queue->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Column blocks per group: about 8 work items per thread in all, blocks of at least 64 columns.
int64_t ColumnBlocks(int64_t num_groups, int64_t n, int64_t threads) {
  const int64_t want = (8 * std::max<int64_t>(threads, 1) + num_groups - 1) / num_groups;
  return std::max<int64_t>(1, std::min(want, n / 64));
}

// Calls block(e, n0, cols) for every column block [n0, n0 + cols) of every group e of an n-column product,
// spread over this thread and the pool.
template <typename Block>
void ForEachColumnBlock(ffi::ThreadPool& pool, int64_t num_groups, int64_t n, Block block) {
  const int64_t blocks = ColumnBlocks(num_groups, n, pool.num_threads()), width = (n + blocks - 1) / blocks;
  ParallelFor(pool, num_groups * blocks, [&](int64_t item) {
    const int64_t n0 = (item % blocks) * width;
    if (n0 < n) block(item / blocks, n0, std::min(width, n - n0));
  });
}

ffi::Error GroupStarts(ffi::Buffer<ffi::S32>& sizes, int64_t rows, std::vector<int64_t>& starts) {
  const int32_t* g = sizes.typed_data();
  const int64_t num_groups = sizes.element_count();
  starts.assign(num_groups + 1, 0);
  for (int64_t e = 0; e < num_groups; ++e) {
    if (g[e] < 0) return ffi::Error::InvalidArgument("grouped matmul: group_sizes has a negative entry");
    starts[e + 1] = starts[e] + g[e];
  }
  if (starts[num_groups] > rows) {
    return ffi::Error::InvalidArgument("grouped matmul: group_sizes sums past the number of lhs rows");
  }
  return ffi::Error::Success();
}

ffi::Error GmmImpl(ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs, ffi::Buffer<ffi::S32> sizes,
                   ffi::ResultBuffer<ffi::F32> out, bool trans_rhs, ffi::ThreadPool pool) {
  if (sgemm == nullptr) return ffi::Error::Internal("grouped matmul: no BLAS sgemm was set");
  const int64_t rows = lhs.dimensions()[0], k = lhs.dimensions()[1];
  const int64_t num_groups = rhs.dimensions()[0];
  const int64_t n = trans_rhs ? rhs.dimensions()[1] : rhs.dimensions()[2];
  std::vector<int64_t> starts;
  if (ffi::Error err = GroupStarts(sizes, rows, starts); err.failure()) return err;
  const float* a = lhs.typed_data();
  const float* b = rhs.typed_data();
  float* c = out->typed_data();
  ForEachColumnBlock(pool, num_groups, n, [&](int64_t e, int64_t n0, int64_t cols) {
    const int64_t m = starts[e + 1] - starts[e];
    if (m == 0) return;
    // rhs[e] is [k, n] (ld n), or [n, k] (ld k) when transposed: column block n0 starts at n0 or at row n0.
    const float* b_block = b + e * k * n + (trans_rhs ? n0 * k : n0);
    sgemm(kRowMajor, kNoTrans, trans_rhs ? kTrans : kNoTrans, m, cols, k, 1.0f, a + starts[e] * k, k, b_block,
          trans_rhs ? k : n, 0.0f, c + starts[e] * n + n0, n);
  });
  std::fill(c + starts[num_groups] * n, c + rows * n, 0.0f);
  return ffi::Error::Success();
}

ffi::Error TgmmImpl(ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs, ffi::Buffer<ffi::S32> sizes,
                    ffi::ResultBuffer<ffi::F32> out, ffi::ThreadPool pool) {
  if (sgemm == nullptr) return ffi::Error::Internal("grouped matmul: no BLAS sgemm was set");
  const int64_t rows = lhs.dimensions()[0], k = lhs.dimensions()[1], n = rhs.dimensions()[1];
  const int64_t num_groups = sizes.element_count();
  std::vector<int64_t> starts;
  if (ffi::Error err = GroupStarts(sizes, rows, starts); err.failure()) return err;
  const float* a = lhs.typed_data();
  const float* b = rhs.typed_data();
  float* c = out->typed_data();
  ForEachColumnBlock(pool, num_groups, n, [&](int64_t e, int64_t n0, int64_t cols) {
    const int64_t m = starts[e + 1] - starts[e];
    float* c_block = c + e * k * n + n0;
    if (m == 0) {
      for (int64_t r = 0; r < k; ++r) std::fill(c_block + r * n, c_block + r * n + cols, 0.0f);
      return;
    }
    sgemm(kRowMajor, kTrans, kNoTrans, k, cols, m, 1.0f, a + starts[e] * k, k, b + starts[e] * n + n0, n, 0.0f,
          c_block, n);
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void m1_jax_set_sgemm(void* sgemm_fn) { sgemm = reinterpret_cast<SgemmFn>(sgemm_fn); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(M1JaxGmm, GmmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_rhs")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(M1JaxTgmm, TgmmImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
