// topk_mask (global, exact count) and nm_mask (n of every m along the reduction dim).
// Ranking matches reference.py: values mapped like torch.nan_to_num(nan=-inf) (NaN lowest,
// ±inf to ±DBL_MAX), ties go to the lower flattened position.
#include "multi_tensor.h"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>

namespace sam_kernels::cpu {
namespace {

inline double rank_key(double v) {
  if (std::isnan(v)) return -std::numeric_limits<double>::infinity();
  if (std::isinf(v)) return v > 0 ? std::numeric_limits<double>::max() : std::numeric_limits<double>::lowest();
  return v;
}

// Scores as rank keys (double), one contiguous copy per tensor.
std::vector<at::Tensor> keys_of(at::TensorList scores) {
  std::vector<at::Tensor> keys;
  for (const auto& s : scores) {
    TORCH_CHECK(s.device().is_cpu(), "mask ops: scores must be on the CPU, got ", s.device());
    TORCH_CHECK(at::isFloatingType(s.scalar_type()), "mask ops: scores must be floating point, got ", s.scalar_type());
    keys.push_back(s.detach().to(at::kDouble).contiguous());
  }
  return keys;
}

std::vector<at::Tensor> topk_mask_cpu(at::TensorList scores, int64_t k) {
  const auto keys = keys_of(scores);
  int64_t total = 0;
  for (const auto& t : keys) total += t.numel();
  TORCH_CHECK(k >= 0 && k <= total, "topk_mask: k=", k, " outside [0, ", total, "]");
  std::vector<double> flat;
  flat.reserve(total);
  for (const auto& t : keys) {
    const double* p = t.data_ptr<double>();
    for (int64_t i = 0; i < t.numel(); ++i) flat.push_back(rank_key(p[i]));
  }
  // Threshold = k-th largest key; keep everything above it, then the first ties in position order.
  double threshold = 0.0;
  int64_t ties_to_keep = 0;
  if (k > 0) {
    std::vector<double> work(flat);
    std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), std::greater<double>());
    threshold = work[k - 1];
    int64_t above = 0;
    for (double v : flat) above += v > threshold;
    ties_to_keep = k - above;
  }
  std::vector<at::Tensor> out;
  int64_t pos = 0;
  for (size_t t = 0; t < scores.size(); ++t) {
    auto mask = at::zeros(scores[t].sizes(), at::TensorOptions().dtype(at::kBool));
    bool* m = mask.data_ptr<bool>();
    for (int64_t i = 0; i < mask.numel(); ++i, ++pos) {
      if (k == 0) break;
      const double v = flat[pos];
      m[i] = v > threshold || (v == threshold && ties_to_keep-- > 0);
    }
    if (k == 0) pos += mask.numel();
    out.push_back(mask);
  }
  return out;
}

std::vector<at::Tensor> nm_mask_cpu(at::TensorList scores, int64_t n, int64_t m) {
  TORCH_CHECK(m >= 1 && n >= 0 && n <= m, "nm_mask: need 0 <= n <= m and m >= 1, got n=", n, " m=", m);
  const auto keys = keys_of(scores);
  std::vector<at::Tensor> out;
  for (size_t t = 0; t < scores.size(); ++t) {
    const auto& s = scores[t];
    auto mask = at::zeros(s.sizes(), at::TensorOptions().dtype(at::kBool));
    const int64_t numel = s.numel();
    const int64_t rows = (s.dim() <= 1 || numel == 0) ? 1 : s.size(0);
    const int64_t cols = rows == 0 ? 0 : numel / rows;
    const double* key = keys[t].data_ptr<double>();
    bool* keep = mask.data_ptr<bool>();
    const int64_t groups_per_row = (cols + m - 1) / m;
    at::parallel_for(0, rows * groups_per_row, 256, [&](int64_t lo, int64_t hi) {
      std::vector<int64_t> idx(m);
      for (int64_t g = lo; g < hi; ++g) {
        const int64_t begin = (g / groups_per_row) * cols + (g % groups_per_row) * m;
        const int64_t r = std::min(m, (g / groups_per_row) * cols + cols - begin);
        const int64_t take = std::min(n, r);
        std::iota(idx.begin(), idx.begin() + r, begin);
        std::partial_sort(idx.begin(), idx.begin() + take, idx.begin() + r, [&](int64_t a, int64_t b) {
          // rank_key, as topk_mask: NaN ranks last (a raw > would keep NaNs and lose the real maxima)
          const double ka = rank_key(key[a]), kb = rank_key(key[b]);
          return ka > kb || (ka == kb && a < b);
        });
        for (int64_t j = 0; j < take; ++j) keep[idx[j]] = true;
      }
    });
    out.push_back(mask);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sam_kernels, CPU, m) {
  m.impl("topk_mask", &topk_mask_cpu);
  m.impl("nm_mask", &nm_mask_cpu);
}

}  // namespace sam_kernels::cpu
