// The test program that tests/test_cpp.py drives (also built with the sanitizers):
//
//   v2t-test crops EXPORT OUT.bin IMAGE...        the uint8 crops (n, 3, S, S) of image files (crop)
//   v2t-test preprocess EXPORT OUT.bin LIST       the uint8 crops (videos, F, 3, S, S) that
//                                                 preprocess (several decoding threads) gives
//   v2t-test pixels EXPORT CROPS.bin N BATCH [MAX_NEW_TOKENS]
//                                                 greedy token ids and captions of uint8 crops
//                                                 (N, F, 3, S, S): "id id ...<TAB>caption" a video
//   v2t-test errors EXPORT GOOD.jpg               the C API's error paths
//   v2t-test threads EXPORT LIST THREADS          concurrent captions == single-thread captions
//   v2t-test sampling EXPORT LIST                 seeded sampling: reproducible, batch-independent
//
// Checks print "PASS name" or "FAIL name: why"; the exit status is the number of failures.
#include <atomic>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "v2t.h"
#include "v2t/captioner.hpp"

namespace {

int failures = 0;

void check(bool ok, const std::string& name, const std::string& why = "") {
  std::cout << (ok ? "PASS " : "FAIL ") << name << (ok || why.empty() ? "" : ": " + why) << '\n';
  failures += ok ? 0 : 1;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// LIST: one video per line, frame_num image files each.
std::vector<std::vector<std::vector<uint8_t>>> read_videos(const std::string& list) {
  std::ifstream in(list);
  std::vector<std::vector<std::vector<uint8_t>>> videos;
  for (std::string line; std::getline(in, line);) {
    std::istringstream words(line);
    std::vector<std::vector<uint8_t>> frames;
    for (std::string w; words >> w;) frames.push_back(read_file(w));
    if (!frames.empty()) videos.push_back(std::move(frames));
  }
  return videos;
}

std::vector<std::vector<v2t::Frame>> as_frames(const std::vector<std::vector<std::vector<uint8_t>>>& videos) {
  std::vector<std::vector<v2t::Frame>> out;
  for (const auto& v : videos) {
    out.emplace_back();
    for (const auto& bytes : v) out.back().push_back(v2t::Frame::encoded(bytes));
  }
  return out;
}

int crops(const std::string& dir, const std::string& out_path, const std::vector<std::string>& files) {
  const auto cap = v2t::Captioner::load(dir);
  std::ofstream out(out_path, std::ios::binary);
  for (const auto& f : files) {
    const auto bytes = read_file(f);
    const auto crop = cap->crop(v2t::Frame::encoded(bytes, f));
    out.write(reinterpret_cast<const char*>(crop.data()), std::streamsize(crop.size()));
  }
  return 0;
}

int preprocess(const std::string& dir, const std::string& out_path, const std::string& list) {
  const auto cap = v2t::Captioner::load(dir, v2t::LoadOptions{2});  // two decoding threads
  const auto videos = read_videos(list);
  const auto crops = cap->preprocess(as_frames(videos));
  std::ofstream out(out_path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(crops.data()), std::streamsize(crops.size()));
  return 0;
}

int pixels(const std::string& dir, const std::string& path, size_t n, int batch, int max_new_tokens) {
  const auto cap = v2t::Captioner::load(dir);
  const auto crops = read_file(path);
  const size_t per_video = size_t(cap->frame_num()) * 3 * size_t(cap->img_size()) * size_t(cap->img_size());
  if (crops.size() != n * per_video) throw std::runtime_error(path + " does not hold N videos' uint8 crops");
  v2t::SearchOptions opts;
  opts.batch = batch;
  opts.max_new_tokens = max_new_tokens;
  const auto ids = cap->generate_ids(crops.data(), n, opts);
  const auto captions = cap->caption_pixels(crops.data(), n, opts);
  const size_t T = ids.size() / n;
  for (size_t v = 0; v < n; ++v) {
    for (size_t t = 0; t < T; ++t) std::cout << (t ? " " : "") << ids[v * T + t];
    std::cout << '\t' << captions[v][0] << '\n';
  }
  return 0;
}

bool mentions(const char* message, const std::string& what) { return std::strstr(message, what.c_str()) != nullptr; }

void expect(v2t_status got, v2t_status want, const std::string& name, const std::string& mention) {
  const std::string msg = v2t_last_error();
  check(got == want && mentions(msg.c_str(), mention), name,
        "status " + std::to_string(got) + " (want " + std::to_string(want) + "), message '" + msg + "' (want it to name '" +
            mention + "')");
}

int errors(const std::string& dir, const std::string& good_path) {
  v2t_captioner* cap = nullptr;
  expect(v2t_load("/nonexistent/v2t-export", 0, &cap), V2T_ERR_ARTIFACT, "load: missing directory", "/nonexistent/v2t-export");
  check(cap == nullptr, "load: no handle on failure");
  expect(v2t_load("/", 0, &cap), V2T_ERR_ARTIFACT, "load: not an export", "manifest.json");
  expect(v2t_load(nullptr, 0, &cap), V2T_ERR_INVALID_ARGUMENT, "load: NULL directory", "export_dir");
  expect(v2t_load(dir.c_str(), -1, &cap), V2T_ERR_INVALID_ARGUMENT, "load: negative threads", "threads");
  check(v2t_load(dir.c_str(), 1, &cap) == V2T_OK && cap != nullptr, "load: the export", v2t_last_error());
  if (cap == nullptr) return failures;
  const size_t F = size_t(v2t_frame_num(cap));
  const auto good = read_file(good_path);
  const std::vector<uint8_t> junk = {'n', 'o', 't', ' ', 'a', 'n', ' ', 'i', 'm', 'a', 'g', 'e'};
  const std::vector<uint8_t> truncated(good.begin(), good.begin() + long(good.size() / 2));
  std::vector<const uint8_t*> data(F, good.data());
  std::vector<size_t> sizes(F, good.size());
  v2t_captions* out = nullptr;
  check(v2t_caption_images(cap, data.data(), sizes.data(), 1, F, nullptr, &out) == V2T_OK && v2t_captions_count(out) == 1,
        "caption: good frames", v2t_last_error());
  v2t_captions_free(out);
  data[F - 1] = junk.data();
  sizes[F - 1] = junk.size();
  expect(v2t_caption_images(cap, data.data(), sizes.data(), 1, F, nullptr, &out), V2T_ERR_IMAGE, "caption: not an image",
         "video 1 frame " + std::to_string(F));
  check(out == nullptr, "caption: no captions on failure");
  data[F - 1] = truncated.data();
  sizes[F - 1] = truncated.size();
  expect(v2t_caption_images(cap, data.data(), sizes.data(), 1, F, nullptr, &out), V2T_ERR_IMAGE, "caption: truncated JPEG",
         "truncated");
  data[F - 1] = good.data();
  sizes[F - 1] = 0;
  expect(v2t_caption_images(cap, data.data(), sizes.data(), 1, F, nullptr, &out), V2T_ERR_INVALID_ARGUMENT,
         "caption: empty frame", "empty frame");
  sizes[F - 1] = good.size();
  expect(v2t_caption_images(cap, data.data(), sizes.data(), 1, F - 1, nullptr, &out), V2T_ERR_INVALID_ARGUMENT,
         "caption: too few frames", "frame_num");
  std::vector<const uint8_t*> more(F + 1, good.data());
  std::vector<size_t> more_sizes(F + 1, good.size());
  expect(v2t_caption_images(cap, more.data(), more_sizes.data(), 1, F + 1, nullptr, &out), V2T_ERR_INVALID_ARGUMENT,
         "caption: too many frames", "frame_num");
  expect(v2t_caption_images(nullptr, data.data(), sizes.data(), 1, F, nullptr, &out), V2T_ERR_INVALID_ARGUMENT,
         "caption: NULL captioner", "captioner");
  v2t_search_options bad = v2t_default_search_options();
  bad.top_p = 0.0;
  expect(v2t_caption_images(cap, data.data(), sizes.data(), 1, F, &bad, &out), V2T_ERR_INVALID_ARGUMENT, "caption: top_p 0",
         "top_p");
  bad = v2t_default_search_options();
  bad.max_new_tokens = 100000;
  expect(v2t_caption_images(cap, data.data(), sizes.data(), 1, F, &bad, &out), V2T_ERR_INVALID_ARGUMENT,
         "caption: max_new_tokens too long", "max_new_tokens");
  std::vector<const uint8_t*> rgb(F, good.data());
  std::vector<int> widths(F, 4), heights(F, 4);
  widths[0] = 0;
  expect(v2t_caption_rgb(cap, rgb.data(), widths.data(), heights.data(), 1, F, nullptr, &out), V2T_ERR_INVALID_ARGUMENT,
         "caption_rgb: zero width", "width");
  v2t_free(cap);
  return failures;
}

int threads(const std::string& dir, const std::string& list, int n_threads) {
  const auto cap = v2t::Captioner::load(dir, v2t::LoadOptions{1});
  const auto videos = read_videos(list);
  const auto frames = as_frames(videos);
  const auto reference = cap->caption_batch(frames);  // one thread, batches of 8
  std::vector<std::vector<std::vector<std::string>>> got(static_cast<size_t>(n_threads));
  std::vector<std::thread> pool;
  for (int t = 0; t < n_threads; ++t) {
    pool.emplace_back([&, t] {
      v2t::SearchOptions opts;
      opts.batch = 1 + t % 3;  // different batch compositions in each thread
      try {
        got[size_t(t)] = cap->caption_batch(frames, opts);
      } catch (const std::exception& e) {
        std::cout << "thread " << t << ": " << e.what() << '\n';
      }
    });
  }
  for (auto& th : pool) th.join();
  for (int t = 0; t < n_threads; ++t) check(got[size_t(t)] == reference, "thread " + std::to_string(t) + " == one thread");
  for (const auto& c : reference) std::cout << "caption " << c[0] << '\n';
  return failures;
}

int sampling(const std::string& dir, const std::string& list) {
  const auto cap = v2t::Captioner::load(dir, v2t::LoadOptions{1});
  const auto videos = read_videos(list);
  const auto frames = as_frames(videos);
  v2t::SearchOptions s;
  s.do_sample = true;
  s.top_k = 5;
  s.top_p = 0.9;
  s.temperature = 1.3;
  s.num_return = 3;
  s.seed = 7;
  const auto a = cap->caption_batch(frames, s);
  s.batch = 3;
  const auto b = cap->caption_batch(frames, s);
  check(a == b, "sampling: same seed, other batch size, same captions");
  s.seed = 8;
  check(cap->caption_batch(frames, s) != a, "sampling: another seed, other captions");
  v2t::SearchOptions k1;
  k1.do_sample = true;
  k1.top_k = 1;
  k1.num_return = 2;
  const auto greedy = cap->caption_batch(frames);
  const auto top1 = cap->caption_batch(frames, k1);
  bool same = true;
  for (size_t v = 0; v < frames.size(); ++v) same = same && top1[v][0] == greedy[v][0] && top1[v][1] == greedy[v][0];
  check(same, "sampling: top_k=1 is greedy");
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> a(argv + 1, argv + argc);
  try {
    if (a.size() >= 3 && a[0] == "crops") return crops(a[1], a[2], {a.begin() + 3, a.end()});
    if (a.size() == 4 && a[0] == "preprocess") return preprocess(a[1], a[2], a[3]);
    if ((a.size() == 5 || a.size() == 6) && a[0] == "pixels") {
      return pixels(a[1], a[2], std::stoul(a[3]), std::stoi(a[4]), a.size() == 6 ? std::stoi(a[5]) : 0);
    }
    if (a.size() == 3 && a[0] == "errors") return errors(a[1], a[2]);
    if (a.size() == 4 && a[0] == "threads") return threads(a[1], a[2], std::stoi(a[3]));
    if (a.size() == 3 && a[0] == "sampling") return sampling(a[1], a[2]);
  } catch (const std::exception& e) {
    std::cerr << "v2t-test: " << e.what() << '\n';
    return 100;
  }
  std::cerr << "usage: see the top of cpp/tests/v2t_test.cpp\n";
  return 2;
}
