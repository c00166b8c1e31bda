// manifest.json of an export directory, read and checked as v2t_engine/runtime/manifest.py does.
#include <sys/stat.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "internal.hpp"

namespace v2t {

using nlohmann::json;

namespace {

bool regular_file(const std::string& path, int64_t* size = nullptr) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  if (size) *size = st.st_size;
  return true;
}

ModelConfig parse_config(const json& m, const std::string& where) {
  ModelConfig c;
  auto get = [&](const char* key, int64_t* out, int64_t min) {
    if (!m.contains(key) || !m[key].is_number_integer()) {
      fail(ErrorCode::artifact, where + ": model_config." + key + " is missing or not an integer");
    }
    *out = m[key].get<int64_t>();
    if (*out < min) fail(ErrorCode::artifact, where + ": model_config." + key + " must be >= " + std::to_string(min));
  };
  get("vocab_size", &c.vocab_size, 1);
  get("pad_id", &c.pad_id, 0);
  get("frame_num", &c.frame_num, 1);
  get("img_size", &c.img_size, 1);
  get("text_len", &c.text_len, 1);
  get("n_layer", &c.n_layer, 1);
  get("n_head", &c.n_head, 1);
  get("n_embd", &c.n_embd, 1);
  get("vit_patch_size", &c.vit_patch_size, 1);
  if (c.pad_id >= c.vocab_size) fail(ErrorCode::artifact, where + ": pad_id is outside the vocabulary");
  if (c.n_embd % c.n_head != 0) fail(ErrorCode::artifact, where + ": n_embd is not divisible by n_head");
  return c;
}

std::vector<TensorSpec> parse_specs(const json& list) {
  std::vector<TensorSpec> out;
  for (const auto& t : list) {
    TensorSpec s{t.at("name").get<std::string>(), t.at("dtype").get<std::string>(), {}};
    for (const auto& d : t.at("shape")) {
      s.shape.push_back(d.is_string() ? Dim{-1, d.get<std::string>()} : Dim{d.get<int64_t>(), ""});
    }
    out.push_back(std::move(s));
  }
  return out;
}

bool same(const std::vector<TensorSpec>& a, const std::vector<TensorSpec>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].dtype != b[i].dtype || !(a[i].shape == b[i].shape)) return false;
  }
  return true;
}

void check_graph(const json& graphs, const GraphContract& contract, const std::string& where, std::string* file) {
  const json& g = graphs.at(contract.name);
  if (!same(parse_specs(g.at("inputs")), contract.inputs) || !same(parse_specs(g.at("outputs")), contract.outputs)) {
    fail(ErrorCode::artifact, where + ": the " + contract.name +
                                  " graph's declared inputs and outputs differ from this v2t's contract; "
                                  "re-export with this v2t");
  }
  *file = g.at("file").get<std::string>();
}

void check_files(const json& files, const std::string& dir, const std::string& where) {
  for (const auto& [name, expected] : files.items()) {
    const std::string path = dir + "/" + name;
    int64_t size = 0;
    if (!regular_file(path, &size)) fail(ErrorCode::artifact, path + " is missing (listed in " + where + ")");
    const int64_t want = expected.at("bytes").get<int64_t>();
    if (size != want) {
      fail(ErrorCode::artifact, path + " is " + std::to_string(size) + " bytes, the manifest says " +
                                    std::to_string(want) + ": truncated or replaced; re-export it with `v2t export`");
    }
  }
}

// The format this library reads (manifest.py's FORMAT and FORMAT_VERSION). 2: three graphs
// (frame_encoder, prefill, decode), a fixed-length KV buffer, uint8 frames into the encoder.
constexpr const char* kFormat = "v2t-onnx";
constexpr int64_t kFormatVersion = 2;

Manifest parse(const json& data, const std::string& dir, const std::string& path) {
  const json format = data.value("format", json()), version = data.value("format_version", json());
  if (format != json(kFormat) || version != json(kFormatVersion)) {
    fail(ErrorCode::artifact, path + ": unsupported format " + format.dump() + " version " + version.dump() +
                                  " (this v2t reads " + kFormat + " version " + std::to_string(kFormatVersion) +
                                  "); re-export with this v2t");
  }
  // ONNX Runtime's CPU provider, which this library runs, has no bfloat16 kernels: say so here
  // rather than fail inside a session.
  if (data.value("precision", "fp32") == "bf16") {
    fail(ErrorCode::artifact, path + ": a bf16 export, which ONNX Runtime's CPU provider cannot run (no bfloat16 "
                                     "kernels); export the checkpoint with --precision fp32, fp16 or int8 for CPU");
  }
  Manifest m;
  m.config = parse_config(data.at("model_config"), path);
  const json& graphs = data.at("graphs");
  check_graph(graphs, encoder_contract(m.config), path, &m.encoder_file);
  check_graph(graphs, prefill_contract(m.config), path, &m.prefill_file);
  check_graph(graphs, decode_contract(m.config), path, &m.decode_file);
  m.tokenizer_file = data.at("tokenizer").get<std::string>();
  const json& pre = data.at("preprocessing");
  if (pre.at("img_size").get<int64_t>() != m.config.img_size || pre.at("color").get<std::string>() != "RGB") {
    fail(ErrorCode::artifact, path + ": preprocessing differs from the model config");
  }
  // The library hands the frame encoder uint8 crops and never normalizes: the graph must.
  if (pre.at("normalized_by").get<std::string>() != "frame_encoder") {
    fail(ErrorCode::artifact, path + ": preprocessing.normalized_by is '" + pre.at("normalized_by").get<std::string>() +
                                  "', this v2t hands uint8 crops to a frame_encoder that normalizes them; "
                                  "re-export with this v2t");
  }
  for (const std::string* name : {&m.encoder_file, &m.prefill_file, &m.decode_file, &m.tokenizer_file}) {
    if (!regular_file(dir + "/" + *name)) fail(ErrorCode::artifact, dir + "/" + *name + " is missing (listed in " + path + ")");
  }
  if (data.contains("files")) check_files(data.at("files"), dir, path);
  return m;
}

}  // namespace

Manifest load_manifest(const std::string& dir) {
  const std::string path = dir + "/" + kManifestFile;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    fail(ErrorCode::artifact, path + " not found: " + dir + " is not a v2t export directory (make one with `v2t export`)");
  }
  json data;
  try {
    data = json::parse(in);
  } catch (const json::exception& e) {
    fail(ErrorCode::artifact, path + " is not valid JSON: " + e.what());
  }
  try {
    return parse(data, dir, path);
  } catch (const json::exception& e) {  // a missing key or a value of the wrong type
    fail(ErrorCode::artifact, path + " lacks an entry or has one of the wrong type (" + e.what() +
                                  "); re-export with this v2t");
  }
}

}  // namespace v2t
