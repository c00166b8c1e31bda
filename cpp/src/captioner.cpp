// The Captioner: ONNX Runtime sessions over an export directory, and the KV-cache decoding loop
// of v2t_engine/runtime/generator.py (prefill the frames, then one token per step for a batch of
// rows, each row's cache columns its own). Every call keeps its own preallocated buffers: two
// flat KV buffers per call that take turns as past and present, viewed as (B, nh, S, hs) for the
// current length S, so the decoder writes each step's cache in place and nothing is reallocated.
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>
#include <map>
#include <onnxruntime/onnxruntime_cxx_api.h>

#include "internal.hpp"

namespace v2t {

void fail(ErrorCode code, const std::string& message) { throw Error(code, message); }

namespace {

int available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return 1;
}

std::string dtype_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    default: return "element type " + std::to_string(int(t));
  }
}

struct Declared {
  std::string dtype;
  std::vector<int64_t> shape;  // -1: dynamic
};

// contract.py's GraphContract.check on one side (inputs or outputs) of a session.
void check_side(const std::vector<TensorSpec>& specs, std::map<std::string, Declared> declared, const char* kind,
                const std::string& where) {
  for (const TensorSpec& spec : specs) {
    auto it = declared.find(spec.name);
    if (it == declared.end()) fail(ErrorCode::artifact, where + ": the graph has no " + kind + " '" + spec.name + "'");
    const Declared& d = it->second;
    if (d.dtype != spec.dtype) {
      fail(ErrorCode::artifact, where + ": tensor '" + spec.name + "' is " + d.dtype + ", the contract says " + spec.dtype);
    }
    if (d.shape.size() != spec.shape.size()) {
      fail(ErrorCode::artifact, where + ": tensor '" + spec.name + "' has rank " + std::to_string(d.shape.size()) +
                                    ", the contract says " + std::to_string(spec.shape.size()));
    }
    for (size_t a = 0; a < d.shape.size(); ++a) {
      const Dim& want = spec.shape[a];
      if (d.shape[a] >= 0 && (!want.axis.empty() || want.size != d.shape[a])) {
        fail(ErrorCode::artifact, where + ": tensor '" + spec.name + "' axis " + std::to_string(a) + " is fixed to " +
                                      std::to_string(d.shape[a]) + ", the contract says " +
                                      (want.axis.empty() ? "size " + std::to_string(want.size) : "the dynamic axis '" + want.axis + "'"));
      }
    }
    declared.erase(it);
  }
  if (!declared.empty()) {
    fail(ErrorCode::artifact, where + ": the graph has " + kind + "(s) the contract does not know: " + declared.begin()->first);
  }
}

std::map<std::string, Declared> declared_of(Ort::Session& s, bool inputs) {
  Ort::AllocatorWithDefaultOptions alloc;
  std::map<std::string, Declared> out;
  const size_t n = inputs ? s.GetInputCount() : s.GetOutputCount();
  for (size_t i = 0; i < n; ++i) {
    auto name = inputs ? s.GetInputNameAllocated(i, alloc) : s.GetOutputNameAllocated(i, alloc);
    Ort::TypeInfo type = inputs ? s.GetInputTypeInfo(i) : s.GetOutputTypeInfo(i);
    if (type.GetONNXType() != ONNX_TYPE_TENSOR) {
      out[name.get()] = Declared{"a non-tensor", {}};
      continue;
    }
    auto info = type.GetTensorTypeAndShapeInfo();
    out[name.get()] = Declared{dtype_name(info.GetElementType()), info.GetShape()};
  }
  return out;
}

Ort::Session open_session(Ort::Env& env, const std::string& path, const GraphContract& contract,
                          const Ort::SessionOptions& opts) {
  try {
    Ort::Session s(env, path.c_str(), opts);
    check_side(contract.inputs, declared_of(s, true), "input", path);
    check_side(contract.outputs, declared_of(s, false), "output", path);
    return s;
  } catch (const Ort::Exception& e) {
    fail(ErrorCode::artifact, path + ": ONNX Runtime cannot load this graph (" + e.what() + "); re-export it with `v2t export`");
  }
}

std::vector<const char*> c_names(const std::vector<std::string>& names) {
  std::vector<const char*> out;
  for (const auto& n : names) out.push_back(n.c_str());
  return out;
}

std::vector<std::string> names_of(const std::vector<TensorSpec>& specs) {
  std::vector<std::string> out;
  for (const auto& s : specs) out.push_back(s.name);
  return out;
}

}  // namespace

struct Captioner::Impl {
  std::string dir;
  Manifest manifest;
  ModelConfig cfg;
  LoadOptions load;
  Ort::Env env{ORT_LOGGING_LEVEL_ERROR, "v2t"};
  Ort::Session encoder{nullptr}, decoder{nullptr};
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeCPU);
  Ort::RunOptions encoder_run, decoder_run;
  std::unique_ptr<Detokenizer> tokenizer;
  std::vector<std::string> enc_in, enc_out, dec_in, dec_out;
  float lut[3][256];
  int decode_threads = 1;

  std::vector<float> encode(const float* pixels, int64_t frames) const;
  void prefill(const float* pixels, int64_t k, int64_t per_video, int64_t tensor, float* kv, float* logits) const;
  std::vector<int64_t> generate_chunk(const float* pixels, int64_t k, const SearchOptions& o, int64_t T,
                                      uint64_t first_video) const;
  void run_decoder(std::vector<Ort::Value>& inputs, std::vector<Ort::Value>& outputs) const;
  std::vector<float> pixels_of(const std::vector<std::vector<Frame>>& videos, size_t first, size_t count) const;
  std::vector<int64_t> generate(const float* pixels, size_t videos, const SearchOptions& o, uint64_t first_video) const;
  std::vector<std::vector<std::string>> decode_all(const std::vector<int64_t>& ids, size_t videos, int num_return) const;
};

std::vector<float> Captioner::Impl::encode(const float* pixels, int64_t frames) const {
  const int64_t S = cfg.img_size;
  const int64_t in_shape[4] = {frames, 3, S, S}, out_shape[2] = {frames, cfg.n_embd};
  std::vector<float> out(size_t(frames * cfg.n_embd));
  Ort::Value in = Ort::Value::CreateTensor<float>(cpu, const_cast<float*>(pixels), size_t(frames * 3 * S * S), in_shape, 4);
  Ort::Value emb = Ort::Value::CreateTensor<float>(cpu, out.data(), out.size(), out_shape, 2);
  const char* in_name = enc_in[0].c_str();
  const char* out_name = enc_out[0].c_str();
  try {
    const_cast<Ort::Session&>(encoder).Run(encoder_run, &in_name, &in, 1, &out_name, &emb, 1);
  } catch (const Ort::Exception& e) {
    fail(ErrorCode::runtime, dir + "/" + manifest.encoder_file + ": ONNX Runtime failed (" + e.what() + ")");
  }
  return out;
}

void Captioner::Impl::run_decoder(std::vector<Ort::Value>& inputs, std::vector<Ort::Value>& outputs) const {
  const auto in = c_names(dec_in), out = c_names(dec_out);
  try {
    const_cast<Ort::Session&>(decoder).Run(decoder_run, in.data(), inputs.data(), inputs.size(), out.data(),
                                           outputs.data(), outputs.size());
  } catch (const Ort::Exception& e) {
    fail(ErrorCode::runtime, dir + "/" + manifest.decoder_file + ": ONNX Runtime failed (" + e.what() + ")");
  }
}

// Ort values over the caller's memory (a zero-size tensor still needs a valid pointer).
static Ort::Value i64_tensor(const Ort::MemoryInfo& cpu, int64_t* p, size_t n, std::vector<int64_t> shape) {
  static thread_local int64_t empty = 0;
  return Ort::Value::CreateTensor<int64_t>(cpu, n ? p : &empty, n, shape.data(), shape.size());
}

static Ort::Value f32_tensor(const Ort::MemoryInfo& cpu, float* p, size_t n, std::vector<int64_t> shape) {
  static thread_local float empty = 0.f;
  return Ort::Value::CreateTensor<float>(cpu, n ? p : &empty, n, shape.data(), shape.size());
}

// The prefix step of k videos (their frames at positions 0..F-1, from an empty past), written
// for R = k * per_video rows: row r holds video r / per_video's cache (R, nh, F, hs) at the start
// of each of kv's tensors (`tensor` floats apart) and its first logits (R, V).
void Captioner::Impl::prefill(const float* pixels, int64_t k, int64_t per_video, int64_t tensor, float* kv,
                              float* logits) const {
  const int64_t F = cfg.frame_num, E = cfg.n_embd, nh = cfg.n_head, hs = cfg.head_dim(), V = cfg.vocab_size;
  const int64_t nkv = 2 * cfg.n_layer, R = k * per_video;
  std::vector<float> embeds = encode(pixels, k * F);  // (k, F, E)
  std::vector<int64_t> positions(size_t(k * F)), mask(size_t(k * F), 1);
  for (int64_t i = 0; i < k * F; ++i) positions[size_t(i)] = i % F;
  std::vector<float> present(size_t(nkv * k * nh * F * hs)), first(size_t(k * V));
  std::vector<Ort::Value> in, out;
  in.push_back(i64_tensor(cpu, nullptr, 0, {k, 0}));
  in.push_back(f32_tensor(cpu, embeds.data(), embeds.size(), {k, F, E}));
  in.push_back(i64_tensor(cpu, positions.data(), positions.size(), {k, F}));
  in.push_back(i64_tensor(cpu, mask.data(), mask.size(), {k, F}));
  for (int64_t t = 0; t < nkv; ++t) in.push_back(f32_tensor(cpu, nullptr, 0, {k, nh, 0, hs}));
  out.push_back(f32_tensor(cpu, first.data(), first.size(), {k, V}));
  const size_t one = size_t(k * nh * F * hs), row = size_t(nh * F * hs);
  for (int64_t t = 0; t < nkv; ++t) out.push_back(f32_tensor(cpu, present.data() + t * one, one, {k, nh, F, hs}));
  run_decoder(in, out);
  for (int64_t t = 0; t < nkv; ++t) {  // each candidate starts from its video's prefix
    for (int64_t r = 0; r < R; ++r) std::copy_n(present.data() + t * one + (r / per_video) * row, row, kv + t * tensor + r * row);
  }
  for (int64_t r = 0; r < R; ++r) std::copy_n(first.data() + (r / per_video) * V, V, logits + r * V);
}

// One batch of k videos: token ids (k, num_return, T). The generator.py loop with every row
// starting together: rows whose caption ended feed [PAD] and see only their own new column.
std::vector<int64_t> Captioner::Impl::generate_chunk(const float* pixels, int64_t k, const SearchOptions& o, int64_t T,
                                                     uint64_t first_video) const {
  const int64_t F = cfg.frame_num, E = cfg.n_embd, nh = cfg.n_head, hs = cfg.head_dim(), V = cfg.vocab_size;
  const int64_t nkv = 2 * cfg.n_layer, per_video = o.do_sample ? o.num_return : 1, R = k * per_video;
  const int64_t pad = cfg.pad_id, capacity = F + T, tensor = R * nh * capacity * hs;
  std::vector<float> kv[2] = {std::vector<float>(size_t(nkv * tensor)), std::vector<float>(size_t(nkv * tensor))};
  std::vector<float> logits(size_t(R * V));
  prefill(pixels, k, per_video, tensor, kv[0].data(), logits.data());
  auto i64 = [&](int64_t* p, size_t n, std::vector<int64_t> shape) { return i64_tensor(cpu, p, n, std::move(shape)); };
  auto f32 = [&](float* p, size_t n, std::vector<int64_t> shape) { return f32_tensor(cpu, p, n, std::move(shape)); };
  std::vector<std::mt19937_64> rngs;
  for (int64_t r = 0; r < R && o.do_sample; ++r) {
    std::seed_seq seq{uint32_t(o.seed), uint32_t(o.seed >> 32), uint32_t(first_video + r / per_video), uint32_t(r % per_video)};
    rngs.emplace_back(seq);
  }
  std::vector<int64_t> tokens(size_t(R * T), pad), count(size_t(R), 0), ids(size_t(R), pad), positions(size_t(R), 0);
  std::vector<bool> live(size_t(R), true);
  std::vector<int64_t> mask;
  int cur = 0;
  for (int64_t length = F;; ++length) {
    bool any = false;
    for (int64_t r = 0; r < R; ++r) {
      if (!live[r]) continue;
      const int64_t tok = select_token(logits.data() + r * V, V, o, o.do_sample ? &rngs[size_t(r)] : nullptr);
      tokens[size_t(r * T + count[r]++)] = tok;
      live[r] = tok != pad && count[r] < T;
      any = any || live[r];
    }
    if (!any) break;
    // One token step: each live row feeds its last token at its position.
    mask.assign(size_t(R * (length + 1)), 0);
    for (int64_t r = 0; r < R; ++r) {
      ids[r] = live[r] ? tokens[size_t(r * T + count[r] - 1)] : pad;
      positions[r] = live[r] ? length : 0;
      std::fill_n(mask.begin() + r * (length + 1) + (live[r] ? 0 : length), live[r] ? length + 1 : 1, 1);
    }
    std::vector<Ort::Value> in, out;
    in.push_back(i64(ids.data(), ids.size(), {R, 1}));
    in.push_back(f32(nullptr, 0, {R, 0, E}));
    in.push_back(i64(positions.data(), positions.size(), {R, 1}));
    in.push_back(i64(mask.data(), mask.size(), {R, length + 1}));
    const size_t past = size_t(R * nh * length * hs), present = size_t(R * nh * (length + 1) * hs);
    for (int64_t t = 0; t < nkv; ++t) in.push_back(f32(kv[cur].data() + t * tensor, past, {R, nh, length, hs}));
    out.push_back(f32(logits.data(), logits.size(), {R, V}));
    for (int64_t t = 0; t < nkv; ++t) out.push_back(f32(kv[1 - cur].data() + t * tensor, present, {R, nh, length + 1, hs}));
    run_decoder(in, out);
    cur = 1 - cur;
  }
  std::vector<int64_t> result(size_t(k * o.num_return * T), pad);
  for (int64_t v = 0; v < k; ++v) {
    for (int64_t c = 0; c < o.num_return; ++c) {
      const int64_t r = v * per_video + (per_video == 1 ? 0 : c);
      std::copy_n(tokens.data() + r * T, T, result.data() + (v * o.num_return + c) * T);
    }
  }
  return result;
}

// Frames → normalized pixels (count, F, 3, S, S). Frames are decoded by up to `threads` threads
// at once (each frame is independent); the first failing frame, in input order, is reported.
std::vector<float> Captioner::Impl::pixels_of(const std::vector<std::vector<Frame>>& videos, size_t first,
                                              size_t count) const {
  const int64_t F = cfg.frame_num, S = cfg.img_size, plane = S * S;
  for (size_t v = 0; v < count; ++v) {
    if (int64_t(videos[first + v].size()) != F) {
      fail(ErrorCode::invalid_argument, "video " + std::to_string(first + v + 1) + " has " +
                                            std::to_string(videos[first + v].size()) + " frames, the model takes " +
                                            std::to_string(F) + " (frame_num)");
    }
  }
  std::vector<float> pixels(size_t(count * F * 3 * plane));
  const size_t total = count * size_t(F);
  std::vector<std::exception_ptr> errors(total);
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next++) < total;) {
      const size_t v = i / size_t(F), f = i % size_t(F);
      const Frame& frame = videos[first + v][f];
      const std::string what =
          frame.name.empty() ? "video " + std::to_string(first + v + 1) + " frame " + std::to_string(f + 1) : frame.name;
      try {
        const std::vector<uint8_t> crop = crop_frame(frame, int(S), load.max_image_pixels, what);
        float* out = pixels.data() + i * 3 * size_t(plane);
        for (int64_t c = 0; c < 3; ++c) {
          for (int64_t p = 0; p < plane; ++p) out[c * plane + p] = lut[c][crop[size_t(c * plane + p)]];
        }
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  const size_t helpers = std::min(total, size_t(decode_threads)) > 1 ? std::min(total, size_t(decode_threads)) - 1 : 0;
  std::vector<std::thread> pool;
  for (size_t t = 0; t < helpers; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  return pixels;
}

// ------------------------------------------------------------------ public surface
Captioner::Captioner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Captioner::~Captioner() = default;

std::unique_ptr<Captioner> Captioner::load(const std::string& export_dir, const LoadOptions& options) {
  if (options.device != "cpu") {
    fail(ErrorCode::invalid_argument, "device '" + options.device + "': this build of libv2t runs on cpu only");
  }
  if (options.threads < 0) fail(ErrorCode::invalid_argument, "threads must be >= 0, got " + std::to_string(options.threads));
  auto impl = std::make_unique<Impl>();
  impl->dir = export_dir;
  impl->load = options;
  impl->manifest = load_manifest(export_dir);
  impl->cfg = impl->manifest.config;
  impl->tokenizer = std::make_unique<Detokenizer>(export_dir + "/" + impl->manifest.tokenizer_file);
  Ort::SessionOptions so;
  so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  impl->decode_threads = options.threads ? options.threads : available_cores();
  so.SetIntraOpNumThreads(impl->decode_threads);
  so.SetInterOpNumThreads(1);
  so.SetLogSeverityLevel(3);
  const GraphContract enc = encoder_contract(impl->cfg), dec = decoder_contract(impl->cfg);
  impl->encoder = open_session(impl->env, export_dir + "/" + impl->manifest.encoder_file, enc, so);
  impl->decoder = open_session(impl->env, export_dir + "/" + impl->manifest.decoder_file, dec, so);
  impl->enc_in = names_of(enc.inputs);
  impl->enc_out = names_of(enc.outputs);
  impl->dec_in = names_of(dec.inputs);
  impl->dec_out = names_of(dec.outputs);
  // As the Python backend: the encoder's arena hands its chunks back after each run.
  impl->encoder_run.AddConfigEntry("memory.enable_memory_arena_shrinkage", "cpu:0");
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) impl->lut[c][v] = float((v / 255.0 - impl->manifest.mean[c]) / impl->manifest.std[c]);
  }
  return std::unique_ptr<Captioner>(new Captioner(std::move(impl)));
}

std::vector<int64_t> Captioner::Impl::generate(const float* pixels, size_t videos, const SearchOptions& o,
                                               uint64_t first_video) const {
  check_search_options(o);
  const int64_t limit = cfg.block_size() - cfg.frame_num;
  if (o.max_new_tokens > limit) {
    fail(ErrorCode::invalid_argument, "max_new_tokens=" + std::to_string(o.max_new_tokens) + " must be between 1 and " +
                                          std::to_string(limit) + " for this model");
  }
  const int64_t T = o.max_new_tokens ? o.max_new_tokens : cfg.text_len;
  const int64_t per_video = int64_t(cfg.frame_num * 3 * cfg.img_size * cfg.img_size);
  std::vector<int64_t> out;
  out.reserve(size_t(videos * o.num_return * T));
  for (size_t first = 0; first < videos; first += size_t(o.batch)) {
    const int64_t k = std::min<int64_t>(o.batch, int64_t(videos - first));
    const auto chunk = generate_chunk(pixels + first * per_video, k, o, T, first_video + first);
    out.insert(out.end(), chunk.begin(), chunk.end());
  }
  return out;
}

std::vector<std::vector<std::string>> Captioner::Impl::decode_all(const std::vector<int64_t>& ids, size_t videos,
                                                                  int num_return) const {
  const size_t T = ids.size() / std::max<size_t>(1, videos * size_t(num_return));
  std::vector<std::vector<std::string>> out(videos);
  for (size_t v = 0; v < videos; ++v) {
    for (int c = 0; c < num_return; ++c) out[v].push_back(tokenizer->decode(ids.data() + (v * num_return + c) * T, T));
  }
  return out;
}

std::vector<int64_t> Captioner::generate_ids(const float* pixels, size_t videos, const SearchOptions& o) const {
  return impl_->generate(pixels, videos, o, 0);
}

std::vector<std::vector<std::string>> Captioner::caption_pixels(const float* pixels, size_t videos,
                                                                const SearchOptions& o) const {
  return impl_->decode_all(impl_->generate(pixels, videos, o, 0), videos, o.num_return);
}

std::vector<std::vector<std::string>> Captioner::caption_batch(const std::vector<std::vector<Frame>>& videos,
                                                               const SearchOptions& o) const {
  check_search_options(o);
  std::vector<std::vector<std::string>> out;
  for (size_t first = 0; first < videos.size(); first += size_t(o.batch)) {
    const size_t k = std::min(size_t(o.batch), videos.size() - first);
    const std::vector<float> pixels = impl_->pixels_of(videos, first, k);
    for (auto& c : impl_->decode_all(impl_->generate(pixels.data(), k, o, first), k, o.num_return)) {
      out.push_back(std::move(c));
    }
  }
  return out;
}

std::vector<std::string> Captioner::caption(const std::vector<Frame>& frames, const SearchOptions& o) const {
  return caption_batch({frames}, o).front();
}

std::vector<float> Captioner::preprocess(const std::vector<std::vector<Frame>>& videos) const {
  return impl_->pixels_of(videos, 0, videos.size());
}

std::vector<uint8_t> Captioner::crop(const Frame& frame) const {
  return crop_frame(frame, int(impl_->cfg.img_size), impl_->load.max_image_pixels, frame.name.empty() ? "frame" : frame.name);
}

std::vector<float> Captioner::normalize(const std::vector<uint8_t>& crops) const {
  const size_t plane = size_t(impl_->cfg.img_size * impl_->cfg.img_size);
  if (crops.size() % (3 * plane) != 0) fail(ErrorCode::invalid_argument, "crops must be (n, 3, S, S) uint8");
  std::vector<float> out(crops.size());
  for (size_t i = 0; i < crops.size(); ++i) out[i] = impl_->lut[(i / plane) % 3][crops[i]];
  return out;
}

std::string Captioner::decode(const int64_t* ids, size_t n) const { return impl_->tokenizer->decode(ids, n); }
int Captioner::frame_num() const { return int(impl_->cfg.frame_num); }
int Captioner::img_size() const { return int(impl_->cfg.img_size); }
int Captioner::text_len() const { return int(impl_->cfg.text_len); }

}  // namespace v2t
