// The graph contract, as v2t_engine/runtime/contract.py declares it: the only C++ file that spells
// tensor names. load_manifest compares manifest.json's declarations with these, and the captioner
// checks each ONNX Runtime session against them.
#include "internal.hpp"

namespace v2t {

const char* const kEncoderFile = "frame_encoder.onnx";
const char* const kDecoderFile = "decoder.onnx";
const char* const kManifestFile = "manifest.json";

namespace {
Dim fixed(int64_t n) { return Dim{n, ""}; }
Dim axis(const char* name) { return Dim{-1, name}; }
}  // namespace

GraphContract encoder_contract(const ModelConfig& cfg) {
  return GraphContract{
      "frame_encoder",
      {{"frames", "float32", {axis("num_frames"), fixed(3), fixed(cfg.img_size), fixed(cfg.img_size)}}},
      {{"frame_embeds", "float32", {axis("num_frames"), fixed(cfg.n_embd)}}}};
}

GraphContract decoder_contract(const ModelConfig& cfg) {
  GraphContract c{"decoder",
                  {{"input_ids", "int64", {axis("batch"), axis("new_tokens")}},
                   {"prefix_embeds", "float32", {axis("batch"), axis("prefix_len"), fixed(cfg.n_embd)}},
                   {"position_ids", "int64", {axis("batch"), axis("step_len")}},
                   {"attention_mask", "int64", {axis("batch"), axis("total_len")}}},
                  {{"logits", "float32", {axis("batch"), fixed(cfg.vocab_size)}}}};
  const std::vector<Dim> past{axis("batch"), fixed(cfg.n_head), axis("past_len"), fixed(cfg.head_dim())};
  const std::vector<Dim> present{axis("batch"), fixed(cfg.n_head), axis("total_len"), fixed(cfg.head_dim())};
  for (int64_t i = 0; i < cfg.n_layer; ++i) {
    for (const char* kind : {"key", "value"}) {
      const std::string layer = std::to_string(i) + "." + kind;
      c.inputs.push_back({"past_key_values." + layer, "float32", past});
      c.outputs.push_back({"present." + layer, "float32", present});
    }
  }
  return c;
}

}  // namespace v2t
