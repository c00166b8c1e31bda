// The graph contract, as v2t_engine/runtime/contract.py declares it: the only C++ file that spells
// tensor names. load_manifest compares manifest.json's declarations with these, and the captioner
// checks each ONNX Runtime session against them.
//
// Three graphs: the frame encoder (uint8 crops; CLIP normalisation is inside the graph), the
// prefill over each video's frame embeddings, and the decode step over a fixed-length KV buffer
// (B, nh, cache_len, hs) in which a row's column c holds position c; decode only reads the buffer
// and returns the step's key/value for the caller to write into column `position`.
#include "internal.hpp"

namespace v2t {

const char* const kEncoderFile = "frame_encoder.onnx";
const char* const kPrefillFile = "prefill.onnx";
const char* const kDecodeFile = "decode.onnx";
const char* const kManifestFile = "manifest.json";

namespace {
Dim fixed(int64_t n) { return Dim{n, ""}; }
Dim axis(const char* name) { return Dim{-1, name}; }

std::vector<std::string> kv_names(const char* prefix, int64_t n_layer) {
  std::vector<std::string> out;
  for (int64_t i = 0; i < n_layer; ++i) {
    for (const char* kind : {"key", "value"}) out.push_back(std::string(prefix) + std::to_string(i) + "." + kind);
  }
  return out;
}
}  // namespace

std::vector<std::string> cache_names(int64_t n_layer) { return kv_names("cache.", n_layer); }
std::vector<std::string> kv_out_names(int64_t n_layer) { return kv_names("kv_out.", n_layer); }

GraphContract encoder_contract(const ModelConfig& cfg) {
  return GraphContract{
      "frame_encoder",
      {{"frames", "uint8", {axis("num_frames"), fixed(3), fixed(cfg.img_size), fixed(cfg.img_size)}}},
      {{"frame_embeds", "float32", {axis("num_frames"), fixed(cfg.n_embd)}}}};
}

GraphContract prefill_contract(const ModelConfig& cfg) {
  GraphContract c{"prefill",
                  {{"prefix_embeds", "float32", {axis("batch"), axis("prefix_len"), fixed(cfg.n_embd)}}},
                  {{"logits", "float32", {axis("batch"), fixed(cfg.vocab_size)}}}};
  const std::vector<Dim> kv{axis("batch"), fixed(cfg.n_head), axis("prefix_len"), fixed(cfg.head_dim())};
  for (const auto& name : kv_out_names(cfg.n_layer)) c.outputs.push_back({name, "float32", kv});
  return c;
}

GraphContract decode_contract(const ModelConfig& cfg) {
  GraphContract c{"decode",
                  {{"input_ids", "int64", {axis("batch"), fixed(1)}},
                   {"position_ids", "int64", {axis("batch"), fixed(1)}}},
                  {{"logits", "float32", {axis("batch"), fixed(cfg.vocab_size)}}}};
  const std::vector<Dim> cache{axis("batch"), fixed(cfg.n_head), axis("cache_len"), fixed(cfg.head_dim())};
  const std::vector<Dim> fresh{axis("batch"), fixed(cfg.n_head), fixed(1), fixed(cfg.head_dim())};
  for (const auto& name : cache_names(cfg.n_layer)) c.inputs.push_back({name, "float32", cache});
  for (const auto& name : kv_out_names(cfg.n_layer)) c.outputs.push_back({name, "float32", fresh});
  return c;
}

}  // namespace v2t
