// libv2t: caption videos with a `v2t export` directory, from C++, without Python.
//
//   auto cap = v2t::Captioner::load("export_dir");            // throws v2t::Error
//   std::vector<v2t::Frame> frames = {v2t::Frame::encoded(jpeg_bytes), ...};  // frame_num of them
//   std::vector<std::string> captions = cap->caption(frames); // greedy by default
//
// Thread safety: a Captioner is immutable after load; every const method may be called from
// several threads at once on the same Captioner (each call keeps its own buffers, ONNX Runtime
// sessions are safe to run concurrently). Sharing the intra-op thread pool, concurrent calls
// do not run faster in total than one batched call.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace v2t {

// What went wrong, as the C API's status codes (v2t.h) number them.
enum class ErrorCode : int {
  invalid_argument = 1,  // a bad option, a wrong frame count, an empty frame
  artifact = 2,          // the export directory: missing files, a manifest or graph off-contract
  image = 3,             // an image that cannot be decoded (not an image, truncated, too large)
  runtime = 4,           // ONNX Runtime failed while running a graph
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

struct LoadOptions {
  int threads = 0;               // ONNX Runtime intra-op threads and frame-decoding threads; 0: the
                                 // cores this process may use
  std::string device = "cpu";    // "cpu" (the ONNX Runtime of the Python wheel has no other)
  int64_t max_image_pixels = 50000000;  // a frame declaring more (width x height) is an image error
};

struct SearchOptions {
  bool do_sample = false;  // false: greedy (the Python captions, token for token)
  int top_k = 0;           // 0: no top-k filter
  double top_p = 1.0;      // 1.0: no nucleus filter
  double temperature = 1.0;
  int num_return = 1;      // captions per video (EasyNLP's max_generated_num)
  uint64_t seed = 0;       // sampling streams: one per (video, candidate) of a call
  int max_new_tokens = 0;  // 0: the model's text_len
  int batch = 8;           // videos decoded together (decoder batch rows)
};

// One frame: encoded image bytes (JPEG or PNG), or an RGB uint8 image (height x width x 3,
// interleaved, rows packed). Either is resized and centre-cropped as v2t's Python does (CLIP).
// A Frame does not own pixels given by pointer: they must outlive the call.
struct Frame {
  const uint8_t* data = nullptr;
  size_t size = 0;     // bytes of an encoded frame
  int width = 0;       // > 0: an RGB frame of width x height
  int height = 0;
  std::string name;    // how errors name this frame (a file name); empty: "frame N"

  static Frame encoded(const std::vector<uint8_t>& bytes, std::string name = {}) {
    return Frame{bytes.data(), bytes.size(), 0, 0, std::move(name)};
  }
  static Frame rgb(const uint8_t* pixels, int width, int height, std::string name = {}) {
    return Frame{pixels, size_t(width) * size_t(height) * 3, width, height, std::move(name)};
  }
};

class Captioner {
 public:
  // Reads manifest.json, checks the graphs against v2t's contract and opens them.
  static std::unique_ptr<Captioner> load(const std::string& export_dir, const LoadOptions& options = {});
  ~Captioner();
  Captioner(const Captioner&) = delete;
  Captioner& operator=(const Captioner&) = delete;

  // One video: exactly frame_num() frames. Returns num_return captions.
  std::vector<std::string> caption(const std::vector<Frame>& frames, const SearchOptions& options = {}) const;
  // Several videos, decoded `options.batch` at a time. Returns num_return captions per video.
  std::vector<std::vector<std::string>> caption_batch(const std::vector<std::vector<Frame>>& videos,
                                                      const SearchOptions& options = {}) const;
  // uint8 crops (videos, frame_num, 3, S, S), what preprocess() or crop() give: Python's
  // Captioner.caption_pixels. The export's frame encoder normalizes them (CLIP mean and std).
  std::vector<std::vector<std::string>> caption_pixels(const uint8_t* crops, size_t videos,
                                                       const SearchOptions& options = {}) const;
  // Token ids (videos, num_return, max_new_tokens), pad after each caption's end.
  std::vector<int64_t> generate_ids(const uint8_t* crops, size_t videos, const SearchOptions& options = {}) const;

  // Videos (frame_num frames each) → uint8 crops (videos, frame_num, 3, S, S), what
  // caption_pixels takes: lets a caller decode the next batch while the current one is captioned.
  std::vector<uint8_t> preprocess(const std::vector<std::vector<Frame>>& videos) const;
  // The uint8 crop (3, S, S) of one frame: Python's preprocess.crop_frame.
  std::vector<uint8_t> crop(const Frame& frame) const;
  std::string decode(const int64_t* ids, size_t n) const;

  int frame_num() const;
  int img_size() const;
  int text_len() const;

 private:
  struct Impl;
  explicit Captioner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace v2t
