// Token selection, as v2t_engine/runtime/search.py: greedy (argmax, first maximum), or sampling
// from logits / temperature with the top-k filter, softmax, then the top-p filter, by inverse CDF
// with one uniform draw. The draws come from std::mt19937_64 streams, not numpy's, so a seed
// gives other samples than Python's (greedy captions are the same).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "internal.hpp"

namespace v2t {

void check_search_options(const SearchOptions& o) {
  if (o.top_k < 0) fail(ErrorCode::invalid_argument, "top_k must be >= 0, got " + std::to_string(o.top_k));
  if (!(o.top_p > 0.0 && o.top_p <= 1.0)) fail(ErrorCode::invalid_argument, "top_p must be in (0, 1], got " + std::to_string(o.top_p));
  if (!(o.temperature > 0.0)) fail(ErrorCode::invalid_argument, "temperature must be > 0, got " + std::to_string(o.temperature));
  if (o.num_return < 1) fail(ErrorCode::invalid_argument, "max_generated_num must be >= 1, got " + std::to_string(o.num_return));
  if (o.batch < 1) fail(ErrorCode::invalid_argument, "batch must be >= 1, got " + std::to_string(o.batch));
  if (o.max_new_tokens < 0) fail(ErrorCode::invalid_argument, "max_new_tokens must be >= 0, got " + std::to_string(o.max_new_tokens));
}

namespace {

std::vector<double> probabilities(const float* logits, int64_t V, const SearchOptions& o) {
  std::vector<double> s(static_cast<size_t>(V), 0.0);
  for (int64_t i = 0; i < V; ++i) s[size_t(i)] = double(logits[i]) / o.temperature;
  if (o.top_k > 0 && o.top_k < V) {  // -inf below the k-th largest; ties at it all survive
    std::vector<double> sorted = s;
    std::nth_element(sorted.begin(), sorted.begin() + (o.top_k - 1), sorted.end(), std::greater<double>());
    const double kth = sorted[size_t(o.top_k - 1)];
    for (double& v : s) {
      if (v < kth) v = -std::numeric_limits<double>::infinity();
    }
  }
  const double top = *std::max_element(s.begin(), s.end());
  double total = 0.0;
  for (double& v : s) total += (v = std::exp(v - top));
  for (double& v : s) v /= total;
  if (o.top_p < 1.0) {  // the smallest prefix by probability reaching top_p; the first survives
    std::vector<int64_t> order(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[size_t(a)] > s[size_t(b)]; });
    double before = 0.0, kept = 0.0;
    std::vector<bool> drop(static_cast<size_t>(V), false);
    for (int64_t i : order) {
      drop[size_t(i)] = before >= o.top_p;
      before += s[size_t(i)];
    }
    for (int64_t i = 0; i < V; ++i) {
      if (drop[size_t(i)]) s[size_t(i)] = 0.0;
      kept += s[size_t(i)];
    }
    for (double& v : s) v /= kept;
  }
  return s;
}

}  // namespace

int64_t select_token(const float* logits, int64_t V, const SearchOptions& o, std::mt19937_64* rng) {
  if (!o.do_sample) return std::max_element(logits, logits + V) - logits;
  const std::vector<double> p = probabilities(logits, V, o);
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(*rng);
  double cumulative = 0.0;
  int64_t chosen = 0, last = 0;
  for (int64_t i = 0; i < V; ++i) {
    cumulative += p[size_t(i)];
    if (cumulative <= u) ++chosen;
    if (p[size_t(i)] > 0) last = i;
  }
  return std::min(chosen, last);
}

}  // namespace v2t
