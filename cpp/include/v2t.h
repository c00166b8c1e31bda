/* libv2t's C API, for other languages' FFI: opaque handles, status codes, a last-error string.
 *
 *   v2t_captioner* cap = NULL;
 *   if (v2t_load("export_dir", 0, &cap) != V2T_OK) fprintf(stderr, "%s\n", v2t_last_error());
 *   v2t_captions* out = NULL;
 *   v2t_status s = v2t_caption_images(cap, frames, sizes, n_frames, NULL, &out);
 *   for (size_t i = 0; s == V2T_OK && i < v2t_captions_count(out); ++i) puts(v2t_captions_get(out, i));
 *   v2t_captions_free(out);
 *   v2t_free(cap);
 *
 * Every function returns a status and never throws or aborts on bad input; on an error the
 * message (naming the file, frame or value at fault) is v2t_last_error(), kept per thread until
 * that thread's next failing call. A v2t_captioner may be used from several threads at once.
 */
#ifndef V2T_H
#define V2T_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum v2t_status {
  V2T_OK = 0,
  V2T_ERR_INVALID_ARGUMENT = 1, /* a NULL handle, a bad option, a wrong frame count */
  V2T_ERR_ARTIFACT = 2,         /* the export directory: missing, incomplete, off-contract */
  V2T_ERR_IMAGE = 3,            /* a frame that cannot be decoded */
  V2T_ERR_RUNTIME = 4,          /* ONNX Runtime failed while running */
  V2T_ERR_INTERNAL = 5          /* out of memory or a bug: the message says which */
} v2t_status;

typedef struct v2t_captioner v2t_captioner;
typedef struct v2t_captions v2t_captions;

typedef struct v2t_search_options {
  int do_sample;       /* 0: greedy */
  int top_k;           /* 0: off */
  double top_p;        /* 1.0: off */
  double temperature;  /* 1.0 */
  int num_return;      /* captions per video */
  uint64_t seed;
  int max_new_tokens;  /* 0: the model's text_len */
  int batch;           /* videos decoded together */
} v2t_search_options;

/* The defaults: greedy, one caption per video, batches of 8. */
v2t_search_options v2t_default_search_options(void);

/* threads: ONNX Runtime intra-op threads, 0 for the cores this process may use. */
v2t_status v2t_load(const char* export_dir, int threads, v2t_captioner** out);
void v2t_free(v2t_captioner* captioner);
int v2t_frame_num(const v2t_captioner* captioner);

/* n_videos videos of frames_per_video encoded images (JPEG or PNG) each, frame-major per video:
 * data[v * frames_per_video + f] holds sizes[...] bytes. options may be NULL (the defaults).
 * *out gets n_videos * num_return captions, video-major. */
v2t_status v2t_caption_images(const v2t_captioner* captioner, const uint8_t* const* data, const size_t* sizes,
                              size_t n_videos, size_t frames_per_video, const v2t_search_options* options,
                              v2t_captions** out);
/* The same with RGB uint8 frames (height x width x 3, interleaved, rows packed). */
v2t_status v2t_caption_rgb(const v2t_captioner* captioner, const uint8_t* const* pixels, const int* widths,
                           const int* heights, size_t n_videos, size_t frames_per_video,
                           const v2t_search_options* options, v2t_captions** out);

size_t v2t_captions_count(const v2t_captions* captions);
const char* v2t_captions_get(const v2t_captions* captions, size_t i); /* UTF-8; NULL past the end */
void v2t_captions_free(v2t_captions* captions);

/* The message of this thread's last failing call ("" if none). */
const char* v2t_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* V2T_H */
