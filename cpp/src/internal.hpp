// libv2t's internal pieces: manifest + contract, image preprocessing, tokenizer, search.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#include "v2t/captioner.hpp"

namespace v2t {

[[noreturn]] void fail(ErrorCode code, const std::string& message);

// ------------------------------------------------------------------ manifest.cpp / contract.cpp
struct ModelConfig {
  int64_t vocab_size = 0, pad_id = 0, frame_num = 0, img_size = 0, text_len = 0;
  int64_t n_layer = 0, n_head = 0, n_embd = 0, vit_patch_size = 0;
  int64_t head_dim() const { return n_embd / n_head; }
  // EasyNLP's img_len + text_len: rows of the decoder's position table (config.py).
  int64_t block_size() const { return (img_size / vit_patch_size) * (img_size / vit_patch_size) + text_len; }
};

// A dimension is a fixed size or a symbolic axis name (as manifest.json writes it).
struct Dim {
  int64_t size = -1;
  std::string axis;  // non-empty: symbolic
  bool operator==(const Dim& o) const { return size == o.size && axis == o.axis; }
};

struct TensorSpec {
  std::string name;
  std::string dtype;  // numpy's spelling: float32, int64
  std::vector<Dim> shape;
};

struct GraphContract {
  std::string name;  // the graph's key in manifest.json
  std::vector<TensorSpec> inputs, outputs;
};

// contract.cpp: the one place in C++ where tensor names are spelled (as contract.py in Python).
GraphContract encoder_contract(const ModelConfig& cfg);  // uint8 crops (N, 3, S, S) → (N, E)
GraphContract prefill_contract(const ModelConfig& cfg);  // (B, F, E) → logits, kv_out (B, nh, F, hs)
GraphContract decode_contract(const ModelConfig& cfg);   // one token per row over the KV buffer
std::vector<std::string> cache_names(int64_t n_layer);   // decode's KV buffer inputs, layer-major, key first
std::vector<std::string> kv_out_names(int64_t n_layer);  // what prefill and decode computed, same order
extern const char* const kEncoderFile;
extern const char* const kPrefillFile;
extern const char* const kDecodeFile;
extern const char* const kManifestFile;

struct Manifest {
  ModelConfig config;
  std::string encoder_file, prefill_file, decode_file, tokenizer_file;
};

// Reads and checks manifest.json as Manifest.load does: format, contract, files and their sizes.
Manifest load_manifest(const std::string& dir);

// ------------------------------------------------------------------ image.cpp
// A frame → uint8 (3, S, S), preprocess.crop_frame's crop: decode (libjpeg-turbo / libpng), PIL's
// bicubic resize of the shorter side to S, torchvision's centre crop, RGB. Not normalized: the
// frame encoder graph takes these bytes and normalizes them itself.
std::vector<uint8_t> crop_frame(const Frame& frame, int size, int64_t max_pixels, const std::string& what);

// ------------------------------------------------------------------ tokenizer.cpp
class Detokenizer {
 public:
  explicit Detokenizer(const std::string& tokenizer_json);
  // The "v2t" decode style of CaptionTokenizer.decode: stop at [PAD], drop specials and ids
  // outside the vocabulary, glue ## pieces, no space next to CJK, one between Latin words.
  std::string decode(const int64_t* ids, size_t n) const;
  int64_t pad_id() const { return pad_id_; }

 private:
  std::vector<std::string> id_to_token_;  // "" where an id has no token
  std::vector<bool> present_;
  std::unordered_set<int64_t> special_;
  int64_t pad_id_ = 0;
};

// ------------------------------------------------------------------ search.cpp
// logits (V) of one row → the token search.py's select_tokens chooses (sampling: with `rng`).
int64_t select_token(const float* logits, int64_t vocab, const SearchOptions& opts, std::mt19937_64* rng);
void check_search_options(const SearchOptions& opts);

}  // namespace v2t
