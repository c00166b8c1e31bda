// Caption text from token ids, as CaptionTokenizer.decode (v2t_engine/tokenizer.py) writes it
// in its default "v2t" style, reading the export's tokenizer.json (WordPiece vocabulary and
// added tokens) with nothing of the `tokenizers` library.
#include <fstream>
#include <nlohmann/json.hpp>

#include "internal.hpp"

namespace v2t {

namespace {

const char* const kSpecialTokens[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
const std::string kPrefix = "##";

// The first / last code point of a UTF-8 string (0 for an empty one).
char32_t decode_at(const std::string& s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return c;
  int extra = c >= 0xf0 ? 3 : c >= 0xe0 ? 2 : 1;
  char32_t cp = c & (0x3f >> extra);
  for (int k = 1; k <= extra && i + k < s.size(); ++k) cp = (cp << 6) | (b(i + k) & 0x3f);
  return cp;
}

char32_t first_char(const std::string& s) { return s.empty() ? 0 : decode_at(s, 0); }

char32_t last_char(const std::string& s) {
  if (s.empty()) return 0;
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xc0) == 0x80) --i;
  return decode_at(s, i);
}

// tokenizer.py's is_cjk: CJK ideographs and CJK / full-width punctuation.
bool is_cjk(char32_t cp) {
  return (0x4E00 <= cp && cp <= 0x9FFF) || (0x3400 <= cp && cp <= 0x4DBF) || (0x20000 <= cp && cp <= 0x2A6DF) ||
         (0x2A700 <= cp && cp <= 0x2CEAF) || (0xF900 <= cp && cp <= 0xFAFF) || (0x2F800 <= cp && cp <= 0x2FA1F) ||
         (0x3000 <= cp && cp <= 0x303F) || (0xFF00 <= cp && cp <= 0xFFEF) || (0x2010 <= cp && cp <= 0x2027);
}

bool in(char32_t cp, const char* set) {
  for (const char* p = set; *p; ++p) {
    if (cp == static_cast<char32_t>(*p)) return true;
  }
  return false;
}

}  // namespace

Detokenizer::Detokenizer(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) fail(ErrorCode::artifact, "cannot read tokenizer " + path);
  nlohmann::json data;
  std::unordered_map<std::string, int64_t> vocab;
  try {
    data = nlohmann::json::parse(file);
    for (const auto& [token, id] : data.at("model").at("vocab").items()) vocab[token] = id.get<int64_t>();
    for (const auto& added : data.value("added_tokens", nlohmann::json::array())) {
      const int64_t id = added.at("id").get<int64_t>();
      vocab[added.at("content").get<std::string>()] = id;
      if (added.value("special", false)) special_.insert(id);
    }
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorCode::artifact, "cannot load tokenizer from " + path + ": " + e.what());
  }
  for (const char* t : kSpecialTokens) {
    if (vocab.count(t)) special_.insert(vocab[t]);
  }
  if (!vocab.count("[PAD]")) fail(ErrorCode::artifact, path + ": the vocabulary has no [PAD] token");
  pad_id_ = vocab["[PAD]"];
  int64_t top = -1;
  for (const auto& [token, id] : vocab) top = std::max(top, id);
  id_to_token_.assign(size_t(top + 1), "");
  present_.assign(size_t(top + 1), false);
  // Added tokens win over the model's own entry for an id, as in `tokenizers`.
  for (const auto& [token, id] : data.at("model").at("vocab").items()) {
    id_to_token_[size_t(id.get<int64_t>())] = token;
    present_[size_t(id.get<int64_t>())] = true;
  }
  for (const auto& added : data.value("added_tokens", nlohmann::json::array())) {
    const auto id = size_t(added.at("id").get<int64_t>());
    id_to_token_[id] = added.at("content").get<std::string>();
    present_[id] = true;
  }
}

std::string Detokenizer::decode(const int64_t* ids, size_t n) const {
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    const int64_t id = ids[i];
    if (id == pad_id_) break;
    if (special_.count(id) || id < 0 || id >= int64_t(present_.size()) || !present_[size_t(id)]) continue;
    const std::string& tok = id_to_token_[size_t(id)];
    if (tok.size() > kPrefix.size() && tok.compare(0, kPrefix.size(), kPrefix) == 0) {
      out += tok.substr(kPrefix.size());  // a continuation piece: glue, even at the start
      continue;
    }
    if (!out.empty() && !tok.empty()) {
      const char32_t prev = last_char(out), first = first_char(tok);
      const bool glue = is_cjk(prev) || is_cjk(first) || in(first, ".,!?;:%)]}") || in(prev, "([{");
      if (!glue) out += ' ';
    }
    out += tok;
  }
  return out;
}

}  // namespace v2t
