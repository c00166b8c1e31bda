// Frame preprocessing that gives the uint8 crops of v2t_engine/inputs/preprocess.py:crop_frame.
//
// Decoding is libjpeg-turbo's (the library Pillow bundles, with Pillow's settings: islow IDCT,
// fancy upsampling) and libpng's. Resizing repeats Pillow's bicubic resampling arithmetic (a = -0.5,
// support scaled by the reduction factor, coefficients in 22-bit fixed point, horizontal pass
// then vertical pass, each rounded to uint8), computed only for the pixels the centre crop keeps.
// The geometry is torchvision's: shorter side to S with the longer side truncated, crop offsets
// rounded half to even. Images with alpha are resized premultiplied, as Pillow does; palette and
// 1-bit images are resized nearest-neighbour, as Pillow does.
//
// Known difference: Pillow 13 runs the vertical pass first for some shapes (seen only on images
// much taller than wide, about 3:1 and beyond, never on the usual video frame shapes), and each
// pass rounds to uint8, so such crops can differ from Python's by a few levels (README, "C++").
#include <png.h>

#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>

extern "C" {
#include <jpeglib.h>
#include <jerror.h>
}

#include "internal.hpp"

namespace v2t {

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

struct Decoded {
  int width = 0, height = 0, channels = 0;  // channels: 3 (RGB) or 4 (RGBA, straight alpha)
  bool nearest = false;                      // palette or 1-bit: Pillow resizes these nearest
  std::vector<uint8_t> pixels;               // height x width x channels
};

// ---------------------------------------------------------------- JPEG (libjpeg-turbo)
struct JpegError {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_on_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

void jpeg_on_message(j_common_ptr cinfo, int level) {
  // A file that ends early is padded with grey by libjpeg, with only a warning; Pillow (with
  // LOAD_TRUNCATED_IMAGES off, as v2t leaves it) fails such a frame, and so do we.
  if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
    auto* err = reinterpret_cast<JpegError*>(cinfo->err);
    std::snprintf(err->message, sizeof err->message, "truncated image");
    longjmp(err->jump, 1);
  }
}

// Everything modified after setjmp lives behind the pointers, so longjmp leaves it well-defined.
bool jpeg_decode_into(const uint8_t* data, size_t size, int64_t max_pixels, jpeg_decompress_struct* cinfo,
                      JpegError* err, Decoded* out) {
  if (setjmp(err->jump)) return false;
  jpeg_mem_src(cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(cinfo, TRUE);
  if (int64_t(cinfo->image_width) * cinfo->image_height > max_pixels) {
    std::snprintf(err->message, sizeof err->message, "%ux%u pixels exceeds the limit of %lld pixels",
                  cinfo->image_width, cinfo->image_height, static_cast<long long>(max_pixels));
    return false;
  }
  if (cinfo->jpeg_color_space == JCS_CMYK || cinfo->jpeg_color_space == JCS_YCCK) {
    std::snprintf(err->message, sizeof err->message, "CMYK JPEG images are not supported");
    return false;
  }
  const bool gray = cinfo->jpeg_color_space == JCS_GRAYSCALE;
  cinfo->out_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(cinfo);
  out->width = int(cinfo->output_width);
  out->height = int(cinfo->output_height);
  out->channels = 3;
  out->pixels.resize(size_t(out->width) * out->height * 3);
  std::vector<uint8_t>& px = out->pixels;
  const size_t stride = size_t(out->width) * 3;
  while (cinfo->output_scanline < cinfo->output_height) {
    uint8_t* row = px.data() + cinfo->output_scanline * stride;
    JSAMPROW rows[1] = {row};
    jpeg_read_scanlines(cinfo, rows, 1);
    if (gray) {  // L → RGB, in place from the right
      for (int x = out->width - 1; x >= 0; --x) row[3 * x] = row[3 * x + 1] = row[3 * x + 2] = row[x];
    }
  }
  jpeg_finish_decompress(cinfo);
  return true;
}

Decoded decode_jpeg(const uint8_t* data, size_t size, int64_t max_pixels, const std::string& what) {
  jpeg_decompress_struct cinfo;
  JpegError err;
  err.message[0] = 0;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_on_error;
  err.mgr.emit_message = jpeg_on_message;
  jpeg_create_decompress(&cinfo);
  Decoded out;
  const bool ok = jpeg_decode_into(data, size, max_pixels, &cinfo, &err, &out);
  jpeg_destroy_decompress(&cinfo);
  if (!ok) fail(ErrorCode::image, what + ": cannot decode JPEG (" + err.message + ")");
  return out;
}

// ---------------------------------------------------------------- PNG (libpng)
struct PngReader {
  const uint8_t* data;
  size_t size, pos;
  char message[256];
};

void png_on_error(png_structp png, png_const_charp msg) {
  auto* r = static_cast<PngReader*>(png_get_error_ptr(png));
  std::snprintf(r->message, sizeof r->message, "%s", msg);
  png_longjmp(png, 1);
}

void png_on_warning(png_structp, png_const_charp) {}

void png_read_memory(png_structp png, png_bytep dst, png_size_t n) {
  auto* r = static_cast<PngReader*>(png_get_io_ptr(png));
  if (n > r->size - r->pos) png_error(png, "truncated image");
  std::memcpy(dst, r->data + r->pos, n);
  r->pos += n;
}

bool png_decode_into(png_structp png, png_infop info, int64_t max_pixels, PngReader* reader, Decoded* out,
                     std::vector<png_bytep>* rows) {
  if (setjmp(png_jmpbuf(png))) return false;
  png_read_info(png, info);
  const png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
  if (int64_t(w) * h > max_pixels) {
    std::snprintf(reader->message, sizeof reader->message, "%ux%u pixels exceeds the limit of %lld pixels",
                  unsigned(w), unsigned(h), static_cast<long long>(max_pixels));
    return false;
  }
  const int depth = png_get_bit_depth(png, info), type = png_get_color_type(png, info);
  if (depth == 16) png_set_strip_16(png);  // Pillow keeps the high byte too
  if (type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);  // the palette's alpha is dropped, as convert("RGB") does
  if (type == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
  if (type == PNG_COLOR_TYPE_GRAY || type == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  out->width = int(w);
  out->height = int(h);
  out->channels = png_get_channels(png, info);
  out->nearest = type == PNG_COLOR_TYPE_PALETTE || (type == PNG_COLOR_TYPE_GRAY && depth == 1);
  if (out->channels != 3 && out->channels != 4) {
    std::snprintf(reader->message, sizeof reader->message, "unexpected PNG layout");
    return false;
  }
  out->pixels.resize(size_t(w) * h * out->channels);
  rows->resize(h);
  for (png_uint_32 y = 0; y < h; ++y) (*rows)[y] = out->pixels.data() + size_t(y) * w * out->channels;
  png_read_image(png, rows->data());
  png_read_end(png, nullptr);
  return true;
}

Decoded decode_png(const uint8_t* data, size_t size, int64_t max_pixels, const std::string& what) {
  PngReader reader{data, size, 0, {0}};
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &reader, png_on_error, png_on_warning);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    fail(ErrorCode::image, what + ": cannot allocate a PNG decoder");
  }
  png_set_read_fn(png, &reader, png_read_memory);
  Decoded out;
  std::vector<png_bytep> rows;
  const bool ok = png_decode_into(png, info, max_pixels, &reader, &out, &rows);
  png_destroy_read_struct(&png, &info, nullptr);
  if (!ok) fail(ErrorCode::image, what + ": cannot decode PNG (" + reader.message + ")");
  return out;
}

// ---------------------------------------------------------------- Pillow's bicubic resampling
double bicubic(double x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Per output index: the first input index, how many inputs, and fixed-point weights.
struct Coefficients {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weights;  // out_size x ksize
};

Coefficients coefficients(int in_size, int out_size) {
  Coefficients c;
  const double scale = double(float(in_size)) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weights.assign(size_t(out_size) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    int lo = int(center - support + 0.5), hi = int(center + support + 0.5);
    lo = lo < 0 ? 0 : lo;
    hi = (hi > in_size ? in_size : hi) - lo;
    const double inverse = 1.0 / filterscale;
    double total = 0.0;
    for (int x = 0; x < hi; ++x) total += (k[x] = bicubic((x + lo - center + 0.5) * inverse));
    for (int x = 0; x < hi; ++x) {
      const double w = total != 0.0 ? k[x] / total : k[x];
      c.weights[size_t(xx) * c.ksize + x] =
          int32_t(w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
    }
    c.first[xx] = lo;
    c.count[xx] = hi;
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  const int32_t s = v >> kPrecisionBits;  // arithmetic shift, as Pillow's lookup index
  return uint8_t(s < 0 ? 0 : s > 255 ? 255 : s);
}

// Resampled pixels [x0, x0+w) x [y0, y0+h) of `src` resized to out_w x out_h (C channels).
std::vector<uint8_t> resample_window(const uint8_t* src, int in_w, int in_h, int C, int out_w, int out_h, int x0,
                                     int y0, int w, int h) {
  const bool horizontal = out_w != in_w, vertical = out_h != in_h;
  const Coefficients cy = coefficients(in_h, out_h);
  int row_lo = y0, row_hi = y0 + h;  // input rows the vertical pass reads
  if (vertical) {
    row_lo = cy.first[y0];
    row_hi = cy.first[y0 + h - 1] + cy.count[y0 + h - 1];
  }
  // Horizontal pass over the rows needed: (row_hi - row_lo) x w, rounded to uint8 as Pillow's is.
  std::vector<uint8_t> mid(size_t(row_hi - row_lo) * w * C);
  const int32_t half = 1 << (kPrecisionBits - 1);
  if (horizontal) {
    const Coefficients cx = coefficients(in_w, out_w);
    for (int y = row_lo; y < row_hi; ++y) {
      const uint8_t* in = src + size_t(y) * in_w * C;
      uint8_t* o = mid.data() + size_t(y - row_lo) * w * C;
      for (int xx = 0; xx < w; ++xx) {
        const int32_t* k = &cx.weights[size_t(xx + x0) * cx.ksize];
        const int lo = cx.first[xx + x0], n = cx.count[xx + x0];
        for (int ch = 0; ch < C; ++ch) {
          int32_t s = half;
          for (int x = 0; x < n; ++x) s += int32_t(in[(lo + x) * C + ch]) * k[x];
          o[xx * C + ch] = clip8(s);
        }
      }
    }
  } else {
    for (int y = row_lo; y < row_hi; ++y) {
      std::memcpy(mid.data() + size_t(y - row_lo) * w * C, src + (size_t(y) * in_w + x0) * C, size_t(w) * C);
    }
  }
  if (!vertical) return mid;
  std::vector<uint8_t> out(size_t(w) * h * C);
  for (int yy = 0; yy < h; ++yy) {
    const int32_t* k = &cy.weights[size_t(yy + y0) * cy.ksize];
    const int lo = cy.first[yy + y0] - row_lo, n = cy.count[yy + y0];
    for (int i = 0; i < w * C; ++i) {
      int32_t s = half;
      for (int y = 0; y < n; ++y) s += int32_t(mid[size_t(lo + y) * w * C + i]) * k[y];
      out[size_t(yy) * w * C + i] = clip8(s);
    }
  }
  return out;
}

// Source indices of Pillow's nearest-neighbour resize (an affine scale whose source coordinate
// starts at half a step and is accumulated step by step, then truncated).
std::vector<int> nearest_indices(int in_size, int out_size) {
  std::vector<int> idx(static_cast<size_t>(out_size));
  const double step = double(in_size) / out_size;
  double at = step * 0.5;
  for (int i = 0; i < out_size; ++i, at += step) idx[size_t(i)] = std::min(in_size - 1, int(at));
  return idx;
}

std::vector<uint8_t> nearest_window(const uint8_t* src, int in_w, int in_h, int C, int out_w, int out_h, int x0,
                                    int y0, int w, int h) {
  std::vector<uint8_t> out(size_t(w) * h * C);
  const std::vector<int> xs = nearest_indices(in_w, out_w), ys = nearest_indices(in_h, out_h);
  for (int yy = 0; yy < h; ++yy) {
    for (int xx = 0; xx < w; ++xx) {
      std::memcpy(&out[(size_t(yy) * w + xx) * C], src + (size_t(ys[size_t(yy + y0)]) * in_w + xs[size_t(xx + x0)]) * C, C);
    }
  }
  return out;
}

inline uint8_t muldiv255(unsigned a, unsigned b) {
  const unsigned t = a * b + 128;
  return uint8_t(((t >> 8) + t) >> 8);
}

// torchvision's Resize(size): shorter side to size, the longer int(size * long / short).
void resized_size(int w, int h, int size, int* nw, int* nh) {
  const int shorter = std::min(w, h), longer = std::max(w, h);
  const int scaled = int(double(int64_t(size) * longer) / shorter);
  *nw = w <= h ? size : scaled;
  *nh = w <= h ? scaled : size;
}

std::vector<uint8_t> crop_decoded(const uint8_t* px, int w, int h, int C, bool nearest, int size) {
  int nw = w, nh = h;
  resized_size(w, h, size, &nw, &nh);
  // After the resize the image is never smaller than the crop: no padding case.
  const int left = int(std::nearbyint((nw - size) / 2.0)), top = int(std::nearbyint((nh - size) / 2.0));
  std::vector<uint8_t> premultiplied;
  const bool resize = nw != w || nh != h;
  if (resize && C == 4 && !nearest) {  // Pillow resizes RGBA as RGBa (premultiplied alpha)
    premultiplied.assign(px, px + size_t(w) * h * 4);
    for (size_t i = 0; i < premultiplied.size(); i += 4) {
      for (int c = 0; c < 3; ++c) premultiplied[i + c] = muldiv255(premultiplied[i + c], premultiplied[i + 3]);
    }
    px = premultiplied.data();
  }
  std::vector<uint8_t> win;
  if (!resize) {
    win.resize(size_t(size) * size * C);
    for (int y = 0; y < size; ++y) std::memcpy(&win[size_t(y) * size * C], px + (size_t(y + top) * w + left) * C, size_t(size) * C);
  } else if (nearest) {
    win = nearest_window(px, w, h, C, nw, nh, left, top, size, size);
  } else {
    win = resample_window(px, w, h, C, nw, nh, left, top, size, size);
  }
  std::vector<uint8_t> out(size_t(3) * size * size);  // (3, S, S)
  const size_t plane = size_t(size) * size;
  for (size_t i = 0; i < plane; ++i) {
    const uint8_t* p = &win[i * C];
    const unsigned a = C == 4 ? p[3] : 255;
    for (int c = 0; c < 3; ++c) {
      unsigned v = p[c];
      if (resize && C == 4 && !nearest && a != 255 && a != 0) v = std::min(255u, (255u * v) / a);  // RGBa → RGBA
      out[c * plane + i] = uint8_t(v);
    }
  }
  return out;
}

}  // namespace

std::vector<uint8_t> crop_frame(const Frame& frame, int size, int64_t max_pixels, const std::string& what) {
  if (frame.data == nullptr || frame.size == 0) fail(ErrorCode::invalid_argument, what + ": empty frame");
  if (frame.width > 0) {
    if (frame.height <= 0 || frame.size != size_t(frame.width) * size_t(frame.height) * 3) {
      fail(ErrorCode::invalid_argument, what + ": an RGB frame needs height > 0 and width x height x 3 bytes");
    }
    return crop_decoded(frame.data, frame.width, frame.height, 3, false, size);
  }
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', 0x0d, 0x0a, 0x1a, 0x0a};
  Decoded d;
  if (frame.size >= 3 && frame.data[0] == 0xff && frame.data[1] == 0xd8 && frame.data[2] == 0xff) {
    d = decode_jpeg(frame.data, frame.size, max_pixels, what);
  } else if (frame.size >= 8 && std::memcmp(frame.data, kPng, 8) == 0) {
    d = decode_png(frame.data, frame.size, max_pixels, what);
  } else {
    fail(ErrorCode::image, what + ": not an image (neither JPEG nor PNG)");
  }
  return crop_decoded(d.pixels.data(), d.width, d.height, d.channels, d.nearest, size);
}

}  // namespace v2t
