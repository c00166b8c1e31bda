// v2t-caption: print the captions of videos given as image files.
//
//   v2t-caption EXPORT_DIR frame1.jpg frame2.jpg ...      one video, frame_num frames
//   v2t-caption EXPORT_DIR --list videos.txt              one video per line: its frame files
//
// As `v2t predict`, a video uses its first frame_num frames, and one with fewer repeats its last
// frame. Prints one line per video (num_return captions separated by tabs); a video that fails
// prints an empty line and its error on stderr, and the exit status is then 1.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <iostream>
#include <sstream>

#include "v2t/captioner.hpp"

namespace {

const char* kUsage =
    "usage: v2t-caption EXPORT_DIR (FRAME_FILE... | --list FILE) [--threads N] [--batch N]\n"
    "       [--sample] [--top-k K] [--top-p P] [--temperature T] [--seed S]\n"
    "       [--max-generated-num N] [--max-new-tokens N]\n";

struct Args {
  std::string export_dir, list;
  std::vector<std::string> frames;
  v2t::LoadOptions load;
  v2t::SearchOptions search;
};

bool parse(int argc, char** argv, Args* a) {
  if (argc < 3) return false;
  a->export_dir = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string s = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    if (s == "--sample") a->search.do_sample = true;
    else if (s == "--list" && (v = value())) a->list = v;
    else if (s == "--threads" && (v = value())) a->load.threads = std::atoi(v);
    else if (s == "--batch" && (v = value())) a->search.batch = std::atoi(v);
    else if (s == "--top-k" && (v = value())) a->search.top_k = std::atoi(v);
    else if (s == "--top-p" && (v = value())) a->search.top_p = std::atof(v);
    else if (s == "--temperature" && (v = value())) a->search.temperature = std::atof(v);
    else if (s == "--seed" && (v = value())) a->search.seed = std::strtoull(v, nullptr, 10);
    else if (s == "--max-generated-num" && (v = value())) a->search.num_return = std::atoi(v);
    else if (s == "--max-new-tokens" && (v = value())) a->search.max_new_tokens = std::atoi(v);
    else if (s.rfind("--", 0) == 0) return false;
    else a->frames.push_back(s);
  }
  return a->list.empty() != a->frames.empty();
}

std::vector<std::vector<std::string>> read_list(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw v2t::Error(v2t::ErrorCode::invalid_argument, "cannot read the list " + path);
  std::vector<std::vector<std::string>> videos;
  for (std::string line; std::getline(in, line);) {
    std::istringstream words(line);
    std::vector<std::string> files;
    for (std::string w; words >> w;) files.push_back(w);
    if (!files.empty()) videos.push_back(files);
  }
  return videos;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw v2t::Error(v2t::ErrorCode::image, "image file not found: '" + path + "'");
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

struct Video {
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<v2t::Frame> frames;
};

Video load_video(const std::vector<std::string>& files, int frame_num) {
  Video v;
  for (int f = 0; f < frame_num && f < int(files.size()); ++f) v.bytes.push_back(read_file(files[size_t(f)]));
  for (int f = 0; f < frame_num; ++f) {
    const size_t i = std::min(size_t(f), v.bytes.size() - 1);  // pad by repeating the last frame
    v.frames.push_back(v2t::Frame::encoded(v.bytes[i], files[std::min(size_t(f), files.size() - 1)]));
  }
  return v;
}

void print(const std::vector<std::string>& captions) {
  for (size_t c = 0; c < captions.size(); ++c) std::cout << (c ? "\t" : "") << captions[c];
  std::cout << '\n';
}

// A batch of videos read and preprocessed, ready for caption_pixels; `ok` false when some video
// of it failed (the batch is then redone one video at a time, to report just the bad ones).
struct Batch {
  size_t first = 0, n = 0;
  bool ok = false;
  std::vector<uint8_t> crops;
};

Batch prepare(const v2t::Captioner& cap, const std::vector<std::vector<std::string>>& lists, size_t first, size_t n) {
  Batch b{first, n, false, {}};
  try {
    std::vector<Video> videos;
    std::vector<std::vector<v2t::Frame>> frames;
    for (size_t i = first; i < first + n; ++i) videos.push_back(load_video(lists[i], cap.frame_num()));
    for (auto& v : videos) frames.push_back(v.frames);
    b.crops = cap.preprocess(frames);
    b.ok = true;
  } catch (const v2t::Error&) {
  }
  return b;
}

bool caption_one(const v2t::Captioner& cap, const std::vector<std::string>& files, size_t number,
                 const v2t::SearchOptions& opts) {
  try {
    Video v = load_video(files, cap.frame_num());
    print(cap.caption(v.frames, opts));
    return true;
  } catch (const v2t::Error& e) {
    std::cerr << "v2t-caption: video " << number << ": " << e.what() << '\n';
    std::cout << '\n';
    return false;
  }
}

// Batches in order; the next batch's files are read and decoded while the current one runs.
bool caption_all(const v2t::Captioner& cap, const std::vector<std::vector<std::string>>& lists,
                 const v2t::SearchOptions& opts) {
  const size_t batch = size_t(std::max(1, opts.batch));
  auto next = [&](size_t first) {
    return std::async(std::launch::async, prepare, std::cref(cap), std::cref(lists), first,
                      std::min(batch, lists.size() - first));
  };
  if (lists.empty()) return true;
  bool ok = true;
  std::future<Batch> pending = next(0);
  for (size_t first = 0; first < lists.size(); first += batch) {
    Batch b = pending.get();
    if (first + batch < lists.size()) pending = next(first + batch);
    if (b.ok) {
      for (const auto& c : cap.caption_pixels(b.crops.data(), b.n, opts)) print(c);
      continue;
    }
    for (size_t i = b.first; i < b.first + b.n; ++i) ok = caption_one(cap, lists[i], i + 1, opts) && ok;
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (!parse(argc, argv, &args)) {
    std::cerr << kUsage;
    return 2;
  }
  try {
    const auto cap = v2t::Captioner::load(args.export_dir, args.load);
    const auto lists = args.list.empty() ? std::vector<std::vector<std::string>>{args.frames} : read_list(args.list);
    return caption_all(*cap, lists, args.search) ? 0 : 1;
  } catch (const std::exception& e) {  // v2t::Error, or out of memory
    std::cerr << "v2t-caption: " << e.what() << '\n';
    return 1;
  }
}
