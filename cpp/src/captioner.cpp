// The Captioner: ONNX Runtime sessions over an export directory (frame encoder, prefill, decode),
// and the decoding loop of v2t_engine/runtime/generator.py with slot_decoder.py's KV cache: one
// fixed-length buffer per cache tensor, (rows, nh, cache_len, hs) with cache_len = frame_num +
// max_new_tokens, in which a row's column c holds position c. The prefill writes columns [0, F);
// each step feeds every live row its last token at its position, the decode graph only reads the
// buffer, and the returned key/value goes into column `position` of that row. Every call keeps
// its own buffers, allocated once per batch of videos; nothing is compacted or reallocated.
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
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
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

// Ort values over the caller's memory (ONNX Runtime reads inputs and writes outputs in place).
template <typename T>
Ort::Value tensor(const Ort::MemoryInfo& cpu, const T* p, size_t n, const std::vector<int64_t>& shape) {
  return Ort::Value::CreateTensor<T>(cpu, const_cast<T*>(p), n, shape.data(), shape.size());
}

// The KV cache of one batch of rows: per cache tensor (rows, nh, len, hs) in contract order,
// zero-filled (a column no row may see still gets attention weight exactly 0, and 0 * NaN from
// uninitialised memory would poison the row). The first n rows of a tensor are one block.
struct KvBuffer {
  int64_t nh, len, hs;
  std::vector<std::vector<float>> tensors;

  KvBuffer(int64_t n_tensors, int64_t rows, int64_t nh_, int64_t len_, int64_t hs_)
      : nh(nh_), len(len_), hs(hs_), tensors(size_t(n_tensors), std::vector<float>(size_t(rows * nh_ * len_ * hs_))) {}
  // Where row r, head h, column c of tensor t begins (hs floats; the columns of a head follow).
  float* at(size_t t, int64_t r, int64_t h, int64_t c) { return tensors[t].data() + ((r * nh + h) * len + c) * hs; }
};

}  // namespace

struct Captioner::Impl {
  std::string dir;
  Manifest manifest;
  ModelConfig cfg;
  LoadOptions load;
  Ort::Env env{ORT_LOGGING_LEVEL_ERROR, "v2t"};
  Ort::Session encoder{nullptr}, prefill_graph{nullptr}, decode_graph{nullptr};
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeCPU);
  Ort::RunOptions encoder_run, decoder_run;
  std::unique_ptr<Detokenizer> tokenizer;
  std::vector<std::string> enc_in, enc_out, pre_in, pre_out, dec_in, dec_out;
  int decode_threads = 1;

  void run(const Ort::Session& session, const Ort::RunOptions& options, const std::string& file,
           const std::vector<std::string>& in_names, std::vector<Ort::Value>& inputs,
           const std::vector<std::string>& out_names, std::vector<Ort::Value>& outputs) const;
  std::vector<float> encode(const uint8_t* crops, int64_t frames) const;
  void prefill(const uint8_t* crops, int64_t k, int64_t per_video, KvBuffer& kv, float* logits) const;
  void decode(const int64_t* ids, const int64_t* positions, int64_t n, KvBuffer& kv, float* logits,
              std::vector<float>& fresh) const;
  std::vector<int64_t> generate_chunk(const uint8_t* crops, int64_t k, const SearchOptions& o, int64_t T,
                                      uint64_t first_video) const;
  std::vector<uint8_t> crops_of(const std::vector<std::vector<Frame>>& videos, size_t first, size_t count) const;
  std::vector<int64_t> generate(const uint8_t* crops, size_t videos, const SearchOptions& o, uint64_t first_video) const;
  std::vector<std::vector<std::string>> decode_all(const std::vector<int64_t>& ids, size_t videos, int num_return) const;
};

void Captioner::Impl::run(const Ort::Session& session, const Ort::RunOptions& options, const std::string& file,
                          const std::vector<std::string>& in_names, std::vector<Ort::Value>& inputs,
                          const std::vector<std::string>& out_names, std::vector<Ort::Value>& outputs) const {
  const auto in = c_names(in_names), out = c_names(out_names);
  try {
    // Session::Run is safe to call from several threads at once; the C++ wrapper just is not const.
    const_cast<Ort::Session&>(session).Run(options, in.data(), inputs.data(), inputs.size(), out.data(),
                                           outputs.data(), outputs.size());
  } catch (const Ort::Exception& e) {
    fail(ErrorCode::runtime, dir + "/" + file + ": ONNX Runtime failed (" + e.what() + ")");
  }
}

// uint8 crops (frames, 3, S, S) → frame embeddings (frames, E); the graph normalizes.
std::vector<float> Captioner::Impl::encode(const uint8_t* crops, int64_t frames) const {
  const int64_t S = cfg.img_size;
  std::vector<float> out(size_t(frames * cfg.n_embd));
  std::vector<Ort::Value> in, emb;
  in.push_back(tensor(cpu, crops, size_t(frames * 3 * S * S), {frames, 3, S, S}));
  emb.push_back(tensor(cpu, out.data(), out.size(), {frames, cfg.n_embd}));
  run(encoder, encoder_run, manifest.encoder_file, enc_in, in, enc_out, emb);
  return out;
}

// The prefill of k videos (their frames at positions 0..F-1), written for R = k * per_video rows:
// row r takes video r / per_video's keys/values into columns [0, F) of the buffer, and its
// first-token logits into logits (R, V).
void Captioner::Impl::prefill(const uint8_t* crops, int64_t k, int64_t per_video, KvBuffer& kv, float* logits) const {
  const int64_t F = cfg.frame_num, E = cfg.n_embd, nh = cfg.n_head, hs = cfg.head_dim(), V = cfg.vocab_size;
  const size_t nkv = kv.tensors.size();
  const std::vector<float> embeds = encode(crops, k * F);  // (k, F, E)
  const size_t one = size_t(k * nh * F * hs);
  std::vector<float> computed(nkv * one), first(size_t(k * V));  // kv_out (k, nh, F, hs) per tensor; (k, V)
  std::vector<Ort::Value> in, out;
  in.push_back(tensor(cpu, embeds.data(), embeds.size(), {k, F, E}));
  out.push_back(tensor(cpu, first.data(), first.size(), {k, V}));
  for (size_t t = 0; t < nkv; ++t) out.push_back(tensor(cpu, computed.data() + t * one, one, {k, nh, F, hs}));
  run(prefill_graph, decoder_run, manifest.prefill_file, pre_in, in, pre_out, out);
  for (size_t t = 0; t < nkv; ++t) {
    for (int64_t r = 0; r < k * per_video; ++r) {
      for (int64_t h = 0; h < nh; ++h) {
        const float* src = computed.data() + t * one + size_t(((r / per_video) * nh + h) * F * hs);
        std::copy_n(src, F * hs, kv.at(t, r, h, 0));
      }
    }
  }
  for (int64_t r = 0; r < k * per_video; ++r) std::copy_n(first.data() + (r / per_video) * V, V, logits + r * V);
}

// One decode step of rows [0, n): token ids[r] at position positions[r], over the first n rows of
// the buffer, which the graph only reads. Writes logits (n, V) and the step's keys/values into
// `fresh` (per tensor (n, nh, 1, hs), one after another); the caller writes them into the buffer.
void Captioner::Impl::decode(const int64_t* ids, const int64_t* positions, int64_t n, KvBuffer& kv, float* logits,
                             std::vector<float>& fresh) const {
  const int64_t nh = kv.nh, L = kv.len, hs = kv.hs, V = cfg.vocab_size;
  const size_t nkv = kv.tensors.size(), view = size_t(n * nh * L * hs), one = size_t(n * nh * hs);
  fresh.resize(nkv * one);
  std::vector<Ort::Value> in, out;
  in.push_back(tensor(cpu, ids, size_t(n), {n, 1}));
  in.push_back(tensor(cpu, positions, size_t(n), {n, 1}));
  for (size_t t = 0; t < nkv; ++t) in.push_back(tensor(cpu, kv.tensors[t].data(), view, {n, nh, L, hs}));
  out.push_back(tensor(cpu, logits, size_t(n * V), {n, V}));
  for (size_t t = 0; t < nkv; ++t) out.push_back(tensor(cpu, fresh.data() + t * one, one, {n, nh, 1, hs}));
  run(decode_graph, decoder_run, manifest.decode_file, dec_in, in, dec_out, out);
}

// One batch of k videos: token ids (k, num_return, T). generator.py's loop with every row
// starting together: each step runs the rows up to the last live one; rows whose caption ended
// are fed [PAD] at a clamped position and nothing of theirs is written.
std::vector<int64_t> Captioner::Impl::generate_chunk(const uint8_t* crops, int64_t k, const SearchOptions& o, int64_t T,
                                                     uint64_t first_video) const {
  const int64_t F = cfg.frame_num, nh = cfg.n_head, hs = cfg.head_dim(), V = cfg.vocab_size;
  const int64_t per_video = o.do_sample ? o.num_return : 1, R = k * per_video, pad = cfg.pad_id;
  // contract.cache_len: a column for every frame and every caption token, so positions are columns.
  KvBuffer kv(2 * cfg.n_layer, R, nh, F + T, hs);
  // slot_decoder.py's max_pos: positions fed to the graph stay inside its position table.
  const int64_t max_pos = std::min(kv.len, cfg.block_size()) - 1;
  std::vector<float> logits(size_t(R * V)), fresh;
  prefill(crops, k, per_video, kv, logits.data());
  std::vector<std::mt19937_64> rngs;
  for (int64_t r = 0; r < R && o.do_sample; ++r) {
    std::seed_seq seq{uint32_t(o.seed), uint32_t(o.seed >> 32), uint32_t(first_video + r / per_video), uint32_t(r % per_video)};
    rngs.emplace_back(seq);
  }
  std::vector<int64_t> tokens(size_t(R * T), pad), count(size_t(R), 0), ids(size_t(R), pad), positions(size_t(R), 0);
  std::vector<int64_t> pos(size_t(R), F);  // columns each row holds: the position of its next token
  std::vector<bool> live(size_t(R), true);
  for (;;) {
    int64_t active = 0;  // 1 + the last live row
    for (int64_t r = 0; r < R; ++r) {
      if (!live[r]) continue;
      const int64_t tok = select_token(logits.data() + r * V, V, o, o.do_sample ? &rngs[size_t(r)] : nullptr);
      tokens[size_t(r * T + count[r]++)] = tok;
      live[r] = tok != pad && count[r] < T;
      if (live[r]) active = r + 1;
    }
    if (active == 0) break;
    for (int64_t r = 0; r < active; ++r) {
      ids[r] = live[r] ? tokens[size_t(r * T + count[r] - 1)] : pad;
      positions[r] = std::min(pos[r], max_pos);
    }
    decode(ids.data(), positions.data(), active, kv, logits.data(), fresh);
    const size_t one = size_t(active * nh * hs);
    for (int64_t r = 0; r < active; ++r) {
      if (!live[r]) continue;
      for (size_t t = 0; t < kv.tensors.size(); ++t) {
        for (int64_t h = 0; h < nh; ++h) std::copy_n(fresh.data() + t * one + size_t((r * nh + h) * hs), hs, kv.at(t, r, h, pos[r]));
      }
      ++pos[r];
    }
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

// Frames → uint8 crops (count, F, 3, S, S), what the frame encoder takes. Frames are decoded by up
// to `threads` threads at once (each frame is independent); the first failing frame, in input
// order, is reported.
std::vector<uint8_t> Captioner::Impl::crops_of(const std::vector<std::vector<Frame>>& videos, size_t first,
                                                size_t count) const {
  const int64_t F = cfg.frame_num, S = cfg.img_size, plane = S * S;
  for (size_t v = 0; v < count; ++v) {
    if (int64_t(videos[first + v].size()) != F) {
      fail(ErrorCode::invalid_argument, "video " + std::to_string(first + v + 1) + " has " +
                                            std::to_string(videos[first + v].size()) + " frames, the model takes " +
                                            std::to_string(F) + " (frame_num)");
    }
  }
  std::vector<uint8_t> crops(size_t(count * F * 3 * plane));
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
        std::copy(crop.begin(), crop.end(), crops.begin() + long(i * 3 * size_t(plane)));
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
  return crops;
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
  const GraphContract enc = encoder_contract(impl->cfg), pre = prefill_contract(impl->cfg),
                      dec = decode_contract(impl->cfg);
  const Manifest& m = impl->manifest;
  impl->encoder = open_session(impl->env, export_dir + "/" + m.encoder_file, enc, so);
  impl->prefill_graph = open_session(impl->env, export_dir + "/" + m.prefill_file, pre, so);
  impl->decode_graph = open_session(impl->env, export_dir + "/" + m.decode_file, dec, so);
  impl->enc_in = names_of(enc.inputs);
  impl->enc_out = names_of(enc.outputs);
  impl->pre_in = names_of(pre.inputs);
  impl->pre_out = names_of(pre.outputs);
  impl->dec_in = names_of(dec.inputs);
  impl->dec_out = names_of(dec.outputs);
  // As the Python backend: the encoder's arena hands its chunks back after each run.
  impl->encoder_run.AddConfigEntry("memory.enable_memory_arena_shrinkage", "cpu:0");
  return std::unique_ptr<Captioner>(new Captioner(std::move(impl)));
}

std::vector<int64_t> Captioner::Impl::generate(const uint8_t* crops, size_t videos, const SearchOptions& o,
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
    const auto chunk = generate_chunk(crops + first * per_video, k, o, T, first_video + first);
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

std::vector<int64_t> Captioner::generate_ids(const uint8_t* crops, size_t videos, const SearchOptions& o) const {
  return impl_->generate(crops, videos, o, 0);
}

std::vector<std::vector<std::string>> Captioner::caption_pixels(const uint8_t* crops, size_t videos,
                                                                const SearchOptions& o) const {
  return impl_->decode_all(impl_->generate(crops, videos, o, 0), videos, o.num_return);
}

std::vector<std::vector<std::string>> Captioner::caption_batch(const std::vector<std::vector<Frame>>& videos,
                                                               const SearchOptions& o) const {
  check_search_options(o);
  std::vector<std::vector<std::string>> out;
  for (size_t first = 0; first < videos.size(); first += size_t(o.batch)) {
    const size_t k = std::min(size_t(o.batch), videos.size() - first);
    const std::vector<uint8_t> crops = impl_->crops_of(videos, first, k);
    for (auto& c : impl_->decode_all(impl_->generate(crops.data(), k, o, first), k, o.num_return)) {
      out.push_back(std::move(c));
    }
  }
  return out;
}

std::vector<std::string> Captioner::caption(const std::vector<Frame>& frames, const SearchOptions& o) const {
  return caption_batch({frames}, o).front();
}

std::vector<uint8_t> Captioner::preprocess(const std::vector<std::vector<Frame>>& videos) const {
  return impl_->crops_of(videos, 0, videos.size());
}

std::vector<uint8_t> Captioner::crop(const Frame& frame) const {
  return crop_frame(frame, int(impl_->cfg.img_size), impl_->load.max_image_pixels, frame.name.empty() ? "frame" : frame.name);
}

std::string Captioner::decode(const int64_t* ids, size_t n) const { return impl_->tokenizer->decode(ids, n); }
int Captioner::frame_num() const { return int(impl_->cfg.frame_num); }
int Captioner::img_size() const { return int(impl_->cfg.img_size); }
int Captioner::text_len() const { return int(impl_->cfg.text_len); }

}  // namespace v2t
