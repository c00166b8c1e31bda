// The C API (v2t.h) over v2t::Captioner: every exception becomes a status and a last-error string.
#include "v2t.h"

#include <new>
#include <string>
#include <vector>

#include "v2t/captioner.hpp"

struct v2t_captioner {
  std::unique_ptr<v2t::Captioner> impl;
};

struct v2t_captions {
  std::vector<std::string> text;
};

namespace {

thread_local std::string last_error;

v2t_status set_error(v2t_status status, const std::string& message) {
  last_error = message;
  return status;
}

template <typename F>
v2t_status guarded(F&& body) {
  try {
    return body();
  } catch (const v2t::Error& e) {
    return set_error(static_cast<v2t_status>(e.code()), e.what());
  } catch (const std::bad_alloc&) {
    return set_error(V2T_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return set_error(V2T_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return set_error(V2T_ERR_INTERNAL, "internal error");
  }
}

v2t::SearchOptions to_cpp(const v2t_search_options* o) {
  v2t::SearchOptions s;
  if (o == nullptr) return s;
  s.do_sample = o->do_sample != 0;
  s.top_k = o->top_k;
  s.top_p = o->top_p;
  s.temperature = o->temperature;
  s.num_return = o->num_return;
  s.seed = o->seed;
  s.max_new_tokens = o->max_new_tokens;
  s.batch = o->batch;
  return s;
}

v2t_status finish(const v2t::Captioner& cap, const std::vector<std::vector<v2t::Frame>>& videos,
                  const v2t_search_options* options, v2t_captions** out) {
  auto result = std::make_unique<v2t_captions>();
  for (auto& captions : cap.caption_batch(videos, to_cpp(options))) {
    for (auto& c : captions) result->text.push_back(std::move(c));
  }
  *out = result.release();
  return V2T_OK;
}

v2t_status check_call(const v2t_captioner* c, const void* frames, size_t n_videos, size_t per_video,
                      v2t_captions** out) {
  if (out == nullptr) return set_error(V2T_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = nullptr;
  if (c == nullptr || !c->impl) return set_error(V2T_ERR_INVALID_ARGUMENT, "captioner is NULL");
  if (frames == nullptr && n_videos * per_video > 0) return set_error(V2T_ERR_INVALID_ARGUMENT, "frames are NULL");
  if (per_video != size_t(c->impl->frame_num())) {
    return set_error(V2T_ERR_INVALID_ARGUMENT, "frames_per_video is " + std::to_string(per_video) +
                                                   ", the model takes " + std::to_string(c->impl->frame_num()) +
                                                   " (frame_num)");
  }
  return V2T_OK;
}

}  // namespace

extern "C" {

v2t_search_options v2t_default_search_options(void) {
  const v2t::SearchOptions s;
  return v2t_search_options{s.do_sample, s.top_k, s.top_p, s.temperature, s.num_return, s.seed, s.max_new_tokens, s.batch};
}

v2t_status v2t_load(const char* export_dir, int threads, v2t_captioner** out) {
  if (out == nullptr) return set_error(V2T_ERR_INVALID_ARGUMENT, "out is NULL");
  *out = nullptr;
  if (export_dir == nullptr) return set_error(V2T_ERR_INVALID_ARGUMENT, "export_dir is NULL");
  return guarded([&] {
    v2t::LoadOptions options;
    options.threads = threads;
    auto handle = std::make_unique<v2t_captioner>();
    handle->impl = v2t::Captioner::load(export_dir, options);
    *out = handle.release();
    return V2T_OK;
  });
}

void v2t_free(v2t_captioner* captioner) { delete captioner; }

int v2t_frame_num(const v2t_captioner* captioner) {
  return captioner && captioner->impl ? captioner->impl->frame_num() : 0;
}

v2t_status v2t_caption_images(const v2t_captioner* captioner, const uint8_t* const* data, const size_t* sizes,
                              size_t n_videos, size_t frames_per_video, const v2t_search_options* options,
                              v2t_captions** out) {
  if (v2t_status s = check_call(captioner, data, n_videos, frames_per_video, out)) return s;
  if (sizes == nullptr && n_videos > 0) return set_error(V2T_ERR_INVALID_ARGUMENT, "sizes are NULL");
  return guarded([&] {
    std::vector<std::vector<v2t::Frame>> videos(n_videos);
    for (size_t v = 0; v < n_videos; ++v) {
      for (size_t f = 0; f < frames_per_video; ++f) {
        const size_t i = v * frames_per_video + f;
        videos[v].push_back(v2t::Frame{data[i], sizes[i], 0, 0, {}});
      }
    }
    return finish(*captioner->impl, videos, options, out);
  });
}

v2t_status v2t_caption_rgb(const v2t_captioner* captioner, const uint8_t* const* pixels, const int* widths,
                           const int* heights, size_t n_videos, size_t frames_per_video,
                           const v2t_search_options* options, v2t_captions** out) {
  if (v2t_status s = check_call(captioner, pixels, n_videos, frames_per_video, out)) return s;
  if ((widths == nullptr || heights == nullptr) && n_videos > 0) {
    return set_error(V2T_ERR_INVALID_ARGUMENT, "widths or heights are NULL");
  }
  return guarded([&] {
    std::vector<std::vector<v2t::Frame>> videos(n_videos);
    for (size_t v = 0; v < n_videos; ++v) {
      for (size_t f = 0; f < frames_per_video; ++f) {
        const size_t i = v * frames_per_video + f;
        if (widths[i] <= 0 || heights[i] <= 0) {
          throw v2t::Error(v2t::ErrorCode::invalid_argument, "video " + std::to_string(v + 1) + " frame " +
                                                                 std::to_string(f + 1) + ": width and height must be > 0");
        }
        videos[v].push_back(v2t::Frame::rgb(pixels[i], widths[i], heights[i]));
      }
    }
    return finish(*captioner->impl, videos, options, out);
  });
}

size_t v2t_captions_count(const v2t_captions* captions) { return captions ? captions->text.size() : 0; }

const char* v2t_captions_get(const v2t_captions* captions, size_t i) {
  return captions && i < captions->text.size() ? captions->text[i].c_str() : nullptr;
}

void v2t_captions_free(v2t_captions* captions) { delete captions; }

const char* v2t_last_error(void) { return last_error.c_str(); }

}  // extern "C"
