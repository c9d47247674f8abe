// kdq_edge.hpp: everything the C++ edge apps share, with no dependency beyond the C++17 standard library.
//
//   manifest.json  a small JSON reader and the export contract (input size, mean/std, classes, sha256)
//   sha256         verify an artifact before it is loaded (FIPS 180-4)
//   PPM / PGM      read binary (P6/P5) and ASCII (P3/P2) netpbm images, maxval 255
//   resize         Pillow's bilinear resize, bit for bit (antialiased, fixed point), as kdq used in training
//   normalize      x = (pixel / 255 - mean[c]) / std[c] in float32, NCHW
//   run_app        the command line shared by classify_torch and classify_ort; each supplies a Runner
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kdq_edge {

// Typed failures: each maps to an exit status (same as the Python runtime kdq-edge).
struct ModelError : std::runtime_error {  // missing/malformed manifest, sha256 mismatch: exit 3
  using std::runtime_error::runtime_error;
};
struct ImageError : std::runtime_error {  // image cannot be decoded or used: exit 1
  using std::runtime_error::runtime_error;
};
struct UsageError : std::runtime_error {  // bad command line: exit 2
  using std::runtime_error::runtime_error;
};
constexpr int kExitOk = 0, kExitImages = 1, kExitUsage = 2, kExitModel = 3;

// ---------------------------------------------------------------------------------------------- JSON

struct Json {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;

  const Json* find(const std::string& key) const {
    for (const auto& kv : object)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
  const Json& at(const std::string& key) const {
    const Json* v = type == Type::Object ? find(key) : nullptr;
    if (!v) throw std::runtime_error("missing key \"" + key + "\"");
    return *v;
  }
  double num() const {
    if (type != Type::Number) throw std::runtime_error("expected a number");
    return number;
  }
  const std::string& str() const {
    if (type != Type::String) throw std::runtime_error("expected a string");
    return string;
  }
  const std::vector<Json>& arr() const {
    if (type != Type::Array) throw std::runtime_error("expected an array");
    return array;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}
  Json parse() {
    Json v = value();
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("JSON error at byte " + std::to_string(i_) + ": " + what);
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool eat(const char* word) {
    size_t n = std::strlen(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }
  Json value() {
    ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Json v;
    char c = s_[i_];
    if (c == '{') {
      v.type = Json::Type::Object;
      ++i_;
      ws();
      if (i_ < s_.size() && s_[i_] == '}') return ++i_, v;
      while (true) {
        ws();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a key");
        std::string key = string();
        ws();
        if (i_ >= s_.size() || s_[i_++] != ':') fail("expected ':'");
        v.object.emplace_back(std::move(key), value());
        ws();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == '}') { ++i_; return v; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.type = Json::Type::Array;
      ++i_;
      ws();
      if (i_ < s_.size() && s_[i_] == ']') return ++i_, v;
      while (true) {
        v.array.push_back(value());
        ws();
        if (i_ < s_.size() && s_[i_] == ',') { ++i_; continue; }
        if (i_ < s_.size() && s_[i_] == ']') { ++i_; return v; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.type = Json::Type::String;
      v.string = string();
      return v;
    }
    if (eat("true")) { v.type = Json::Type::Bool; v.boolean = true; return v; }
    if (eat("false")) { v.type = Json::Type::Bool; return v; }
    if (eat("null")) return v;
    if (c == '-' || (c >= '0' && c <= '9')) {
      size_t start = i_;
      while (i_ < s_.size() && std::strchr("+-0123456789.eE", s_[i_])) ++i_;
      v.type = Json::Type::Number;
      std::istringstream in(s_.substr(start, i_ - start));
      in.imbue(std::locale::classic());
      if (!(in >> v.number)) fail("bad number");
      return v;
    }
    fail(std::string("unexpected character '") + c + "'");
  }
  static void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    uint32_t cp = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[i_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= h - '0';
      else if (h >= 'a' && h <= 'f') cp |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') cp |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return cp;
  }
  std::string string() {
    ++i_;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && i_ + 1 < s_.size() && s_[i_] == '\\' && s_[i_ + 1] == 'u') {
            i_ += 2;
            uint32_t lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
};

inline std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"') out += "\\\"";
    else if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else out += char(c);
  }
  return out + "\"";
}

// -------------------------------------------------------------------------------------------- SHA-256

inline std::string sha256_hex(const std::string& data) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
      0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
      0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
      0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
      0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
      0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
      0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  std::string msg = data;
  uint64_t bits = uint64_t(data.size()) * 8;
  msg += char(0x80);
  while (msg.size() % 64 != 56) msg += char(0);
  for (int i = 7; i >= 0; --i) msg += char((bits >> (8 * i)) & 0xff);
  uint32_t w[64];
  for (size_t off = 0; off < msg.size(); off += 64) {
    const auto* p = reinterpret_cast<const unsigned char*>(msg.data() + off);
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
  }
  char out[65];
  for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h[i]);
  return std::string(out, 64);
}

// ------------------------------------------------------------------------------------------ manifest

inline bool read_file(const std::string& path, std::string& out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  out = ss.str();
  return bool(f) || f.eof();
}

struct Manifest {
  std::string folder;
  std::string input_name, output_name;
  int height = 0, width = 0;
  bool center_crop = false;  // crop "center": shorter side to the size, then the center square (kdq.data.fit_image)
  float mean[3] = {0, 0, 0}, std[3] = {1, 1, 1};
  double scale = 1.0 / 255;
  std::vector<std::string> classes;
  std::string backend;  // quantization backend (x86, fbgemm, qnnpack) the int8 model was converted for
  // ONNX Runtime session config entries the export was certified with (target.onnxruntime_config), e.g. the
  // arm target's exact int8 kernels: a session without them may compute different logits.
  std::map<std::string, std::string> onnxruntime_config;
  // The `kdq export` certificate's verdict: certified, rejected, not proven; "none" when exported with --no-verify.
  // Only a certified export runs unless --allow-uncertified (run_app).
  std::string verdict = "none", certificate_file = "parity.json";
  struct Artifact {
    std::string file, sha256;
    long long bytes = -1;
  };
  std::map<std::string, Artifact> artifacts;
};

// Reads FOLDER/manifest.json (FOLDER may also be a file inside the export folder, e.g. model.onnx).
inline Manifest load_manifest(const std::string& model) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path dir(model);
  if (!fs::exists(dir, ec))
    throw ModelError(model + ": no such model folder; pass the folder written by `kdq export ... --out DIR`");
  if (!fs::is_directory(dir, ec)) dir = dir.parent_path().empty() ? fs::path(".") : dir.parent_path();
  const std::string folder = dir.string(), path = (dir / "manifest.json").string();
  std::string text;
  if (!fs::is_regular_file(dir / "manifest.json", ec) || !read_file(path, text))
    throw ModelError(folder + ": no manifest.json; a model folder is what `kdq export CHECKPOINT --out DIR` "
                     "writes (model.pt, model.onnx + manifest.json). Without the manifest the preprocessing "
                     "and class names are unknown.");
  Manifest m;
  m.folder = folder;
  try {
    Json j = JsonParser(text).parse();
    const Json* version = j.find("format_version");
    if (!version || version->type != Json::Type::Number || (version->number != 1 && version->number != 2))
      throw ModelError(path + ": format_version is not 1 or 2; this app reads manifest formats 1 and 2: rebuild it "
                       "against a matching kdq-edge or re-export with a matching kdq");
    const Json& in = j.at("input");
    const Json& pre = j.at("preprocessing");
    if (in.at("layout").str() != "NCHW" || in.at("dtype").str() != "float32")
      throw ModelError(path + ": input " + in.at("layout").str() + "/" + in.at("dtype").str() +
                       " is not supported (NCHW float32 is)");
    const std::string crop = version->number >= 2 ? pre.at("crop").str() : "none";  // format 1: stretch
    if (pre.at("resize").str() != "bilinear" || pre.at("color").str() != "RGB" || (crop != "none" && crop != "center"))
      throw ModelError(path + ": preprocessing resize=" + pre.at("resize").str() + " crop=" + crop + " color=" +
                       pre.at("color").str() + " is not supported (bilinear; none or center; RGB)");
    m.center_crop = crop == "center";
    m.input_name = in.at("name").str();
    m.output_name = j.at("output").at("name").str();
    m.height = int(pre.at("size").arr().at(0).num());
    m.width = int(pre.at("size").arr().at(1).num());
    if (m.center_crop && m.width != m.height)
      throw ModelError(path + ": crop center needs a square size, got " + std::to_string(m.height) + "x" +
                       std::to_string(m.width));
    const auto& shape = in.at("shape").arr();
    if (shape.size() != 4 || shape[1].num() != 3 || shape[2].num() != m.height || shape[3].num() != m.width)
      throw ModelError(path + ": input shape disagrees with preprocessing size");
    for (int c = 0; c < 3; ++c) {
      m.mean[c] = float(pre.at("mean").arr().at(c).num());
      m.std[c] = float(pre.at("std").arr().at(c).num());
      if (!(m.std[c] > 0)) throw ModelError(path + ": std must be > 0");
    }
    m.scale = pre.at("scale").num();
    for (const auto& c : j.at("classes").arr()) m.classes.push_back(c.str());
    const auto& out_shape = j.at("output").at("shape").arr();
    if (out_shape.empty() || out_shape.back().num() != double(m.classes.size()))
      throw ModelError(path + ": output shape disagrees with the number of classes");
    if (const Json* q = j.find("quantization"); q && q->find("backend")) m.backend = q->at("backend").str();
    if (const Json* t = j.find("target"); t && t->find("onnxruntime_config"))
      for (const auto& kv : t->at("onnxruntime_config").object) m.onnxruntime_config[kv.first] = kv.second.str();
    if (const Json* c = j.find("certificate"); c && c->type == Json::Type::Object) {
      if (const Json* v = c->find("verdict")) m.verdict = v->str();
      else m.verdict = c->find("passed") && c->at("passed").type == Json::Type::Bool && c->at("passed").boolean
                           ? "certified" : "rejected";  // format-1 certificates: only "passed"
      if (const Json* f = c->find("file")) m.certificate_file = f->str();
    }
    for (const auto& kv : j.at("artifacts").object) {
      Manifest::Artifact a;
      a.file = kv.second.at("file").str();
      a.sha256 = kv.second.at("sha256").str();
      if (const Json* b = kv.second.find("bytes")) a.bytes = (long long)b->num();
      m.artifacts[kv.first] = a;
    }
  } catch (const ModelError&) {
    throw;
  } catch (const std::exception& e) {
    throw ModelError(path + ": malformed manifest (" + e.what() + ")");
  }
  return m;
}

// The artifact's bytes, read once and checked against the manifest: the same bytes are then loaded,
// so the file cannot change between the check and the load.
inline std::string verified_artifact(const Manifest& m, const std::string& fmt) {
  auto it = m.artifacts.find(fmt);
  if (it == m.artifacts.end())
    throw ModelError(m.folder + "/manifest.json: the export has no " + fmt + " artifact");
  const std::string path = m.folder + "/" + it->second.file;
  std::string data;
  if (!read_file(path, data)) throw ModelError(path + ": missing or unreadable; copy the whole export folder");
  std::string actual = sha256_hex(data);
  if (actual != it->second.sha256 || (it->second.bytes >= 0 && (long long)data.size() != it->second.bytes))
    throw ModelError(path + ": sha256 " + actual.substr(0, 16) + "... (" + std::to_string(data.size()) +
                     " bytes) does not match the manifest (" + it->second.sha256.substr(0, 16) + "..., " +
                     std::to_string(it->second.bytes) + " bytes): the model file was modified or corrupted; "
                     "copy the export folder again (refusing to load it)");
  return data;
}

// ------------------------------------------------------------------------------------------- images

struct Image {
  int width = 0, height = 0;
  std::string mode = "RGB";   // before conversion: "RGB" (P6/P3) or "L" (P5/P2, replicated to R=G=B)
  std::vector<uint8_t> rgb;  // height * width * 3, row-major, interleaved
};

inline Image read_pnm(const std::string& path) {
  std::string data;
  if (!std::ifstream(path).good()) throw ImageError(path + ": no such file");
  if (!read_file(path, data)) throw ImageError(path + ": cannot read");
  auto refuse = [&](const std::string& why) -> ImageError {
    return ImageError(path + ": cannot decode image (" + why + ")");
  };
  if (data.size() >= 8 && data.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0)
    throw refuse("PNG; this app reads PPM/PGM only: convert it with `kdq-edge to-ppm IMAGE OUT.ppm`");
  if (data.size() >= 3 && data.compare(0, 3, "\xff\xd8\xff") == 0)
    throw refuse("JPEG; this app reads PPM/PGM only: convert it with `kdq-edge to-ppm IMAGE OUT.ppm`");
  if (data.size() < 2 || data[0] != 'P' || !std::strchr("2356", data[1]) || data[1] == 0) {
    if (data.size() >= 2 && data[0] == 'P' && data[1] == '7')
      throw refuse("PAM (P7), possibly with alpha; flatten it, or convert with `kdq-edge to-ppm IMAGE OUT.ppm`");
    throw refuse("not a PPM (P6/P3) or PGM (P5/P2) file; convert it with `kdq-edge to-ppm IMAGE OUT.ppm`");
  }
  const char kind = data[1];
  size_t i = 2;
  auto header_int = [&]() -> long {
    while (i < data.size()) {  // whitespace and # comments
      if (data[i] == '#') {
        while (i < data.size() && data[i] != '\n') ++i;
      } else if (std::isspace(static_cast<unsigned char>(data[i]))) {
        ++i;
      } else {
        break;
      }
    }
    if (i >= data.size() || !std::isdigit(static_cast<unsigned char>(data[i]))) throw refuse("bad header");
    long v = 0;
    while (i < data.size() && std::isdigit(static_cast<unsigned char>(data[i]))) {
      v = v * 10 + (data[i++] - '0');
      if (v > 1000000) throw refuse("header value too large");
    }
    return v;
  };
  Image im;
  im.width = int(header_int());
  im.height = int(header_int());
  long maxval = header_int();
  if (im.width <= 0 || im.height <= 0) throw refuse("empty image");
  if (maxval != 255)
    throw refuse("maxval " + std::to_string(maxval) + "; only 8-bit (maxval 255) images are supported: "
                 "convert with `kdq-edge to-ppm IMAGE OUT.ppm`");
  const bool gray = kind == '5' || kind == '2';
  im.mode = gray ? "L" : "RGB";
  const size_t channels = gray ? 1 : 3, n = size_t(im.width) * im.height * channels;
  std::vector<uint8_t> px(n);
  if (kind == '5' || kind == '6') {
    if (i >= data.size() || !std::isspace(static_cast<unsigned char>(data[i]))) throw refuse("bad header");
    ++i;  // exactly one whitespace byte before the raster
    if (data.size() - i < n) throw refuse("truncated: " + std::to_string(data.size() - i) + " of " +
                                          std::to_string(n) + " pixel bytes");
    std::memcpy(px.data(), data.data() + i, n);
  } else {
    for (size_t k = 0; k < n; ++k) {
      long v = header_int();
      if (v > 255) throw refuse("sample above maxval");
      px[k] = uint8_t(v);
    }
  }
  im.rgb.resize(size_t(im.width) * im.height * 3);
  for (size_t p = 0; p < size_t(im.width) * im.height; ++p)
    for (int c = 0; c < 3; ++c) im.rgb[3 * p + c] = gray ? px[p] : px[3 * p + c];
  return im;
}

// Pillow's ImagingResample (libImaging/Resample.c) with the bilinear filter on 8-bit RGB: for each output
// pixel, a triangle filter whose support grows with the downscale factor (antialiasing), coefficients
// normalized in double, rounded to 22-bit fixed point; two separable passes, each rounded and clipped to
// uint8. Pass order as in Pillow >= 13 (the version kdq's lock file installs): vertical first when the
// height shrinks by more than twice as many pixels as the width, else horizontal first (Pillow <= 12 was
// always horizontal first; the order changes some pixels by 1/255). Bit-identical to
// `Image.resize((W, H), Image.Resampling.BILINEAR)`; tests/test_edge.py checks it against Pillow.
namespace pil {
constexpr int kPrecisionBits = 32 - 8 - 2;

inline double bilinear(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;      // (first source index, count) per output index
  std::vector<int32_t> weights;  // ksize fixed-point weights per output index
};

inline Coeffs precompute(int in_size, int out_size) {
  const double support_base = 1.0;  // bilinear
  double scale = double(in_size) / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
  double support = support_base * filterscale;
  Coeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  std::vector<double> kk(size_t(out_size) * c.ksize, 0.0);
  c.bounds.assign(size_t(out_size) * 2, 0);
  for (int xx = 0; xx < out_size; ++xx) {
    double center = (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double* k = &kk[size_t(xx) * c.ksize];
    for (int x = 0; x < xmax; ++x) {
      double w = bilinear((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x)
      if (ww != 0.0) k[x] /= ww;
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  c.weights.resize(kk.size());
  for (size_t x = 0; x < kk.size(); ++x)
    c.weights[x] = kk[x] < 0 ? int32_t(-0.5 + kk[x] * (1 << kPrecisionBits))
                             : int32_t(0.5 + kk[x] * (1 << kPrecisionBits));
  return c;
}

inline uint8_t clip8(int32_t v) {
  v >>= kPrecisionBits;
  return uint8_t(v < 0 ? 0 : v > 255 ? 255 : v);
}

// Rows [row0, row0 + rows) of `in`, resampled to width out_w.
inline Image horizontal(const Image& in, int out_w, int row0, int rows) {
  const Coeffs c = precompute(in.width, out_w);
  Image out;
  out.width = out_w;
  out.height = rows;
  out.rgb.assign(size_t(out_w) * rows * 3, 0);
  for (int y = 0; y < rows; ++y)
    for (int xx = 0; xx < out_w; ++xx) {
      const int xmin = c.bounds[2 * xx], xmax = c.bounds[2 * xx + 1];
      const int32_t* k = &c.weights[size_t(xx) * c.ksize];
      for (int ch = 0; ch < 3; ++ch) {
        int32_t ss = 1 << (kPrecisionBits - 1);
        for (int x = 0; x < xmax; ++x) ss += in.rgb[(size_t(y + row0) * in.width + x + xmin) * 3 + ch] * k[x];
        out.rgb[(size_t(y) * out_w + xx) * 3 + ch] = clip8(ss);
      }
    }
  return out;
}

// `in` resampled to height out_h, where row r of `in` is source row r + row0 of an image of src_height rows.
inline Image vertical(const Image& in, int out_h, int src_height, int row0) {
  const Coeffs c = precompute(src_height, out_h);
  Image out;
  out.width = in.width;
  out.height = out_h;
  out.rgb.assign(size_t(in.width) * out_h * 3, 0);
  for (int yy = 0; yy < out_h; ++yy) {
    const int ymin = c.bounds[2 * yy] - row0, ymax = c.bounds[2 * yy + 1];
    const int32_t* k = &c.weights[size_t(yy) * c.ksize];
    for (int x = 0; x < in.width; ++x)
      for (int ch = 0; ch < 3; ++ch) {
        int32_t ss = 1 << (kPrecisionBits - 1);
        for (int y = 0; y < ymax; ++y) ss += in.rgb[(size_t(y + ymin) * in.width + x) * 3 + ch] * k[y];
        out.rgb[(size_t(yy) * out.width + x) * 3 + ch] = clip8(ss);
      }
  }
  return out;
}
}  // namespace pil

inline Image resize_bilinear(const Image& in, int out_w, int out_h) {
  const bool need_h = out_w != in.width, need_v = out_h != in.height;
  Image out;
  if (need_h && need_v && in.height > out_h && in.height - out_h > 2 * (in.width - out_w)) {
    out = pil::horizontal(pil::vertical(in, out_h, in.height, 0), out_w, 0, out_h);
  } else if (need_h && need_v) {
    // Horizontal pass only over the source rows the vertical pass reads.
    const pil::Coeffs v = pil::precompute(in.height, out_h);
    const int first = v.bounds[0], last = v.bounds[2 * out_h - 2] + v.bounds[2 * out_h - 1];
    out = pil::vertical(pil::horizontal(in, out_w, first, last - first), out_h, in.height, first);
  } else if (need_h) {
    out = pil::horizontal(in, out_w, 0, in.height);
  } else if (need_v) {
    out = pil::vertical(in, out_h, in.height, 0);
  } else {
    out = in;
  }
  out.mode = in.mode;
  return out;
}

// uint8 RGB at the model size → float32 NCHW: (pixel / 255 - mean[c]) / std[c], in float32 like kdq.
inline std::vector<float> normalize(const Image& im, const Manifest& m) {
  const float denom = float(1.0 / m.scale);
  const size_t hw = size_t(im.width) * im.height;
  std::vector<float> x(3 * hw);
  for (int c = 0; c < 3; ++c)
    for (size_t p = 0; p < hw; ++p) {
      x[c * hw + p] = (float(im.rgb[3 * p + c]) / denom - m.mean[c]) / m.std[c];  // each op rounded to float
    }
  return x;
}

inline std::vector<float> preprocess(const std::string& path, const Manifest& m, std::string* mode = nullptr) {
  Image im = read_pnm(path);
  if (mode) *mode = im.mode;
  if (!m.center_crop) return normalize(resize_bilinear(im, m.width, m.height), m);
  // torchvision's Resize(size) + CenterCrop(size): the shorter side becomes `size` (the longer one truncated),
  // then the crop starts at round((side - size) / 2), rounding half to even as Python's round() does.
  const int size = m.width;
  int w = size, h = size;
  if (im.width <= im.height) h = int(double(size) * im.height / im.width);
  else w = int(double(size) * im.width / im.height);
  Image fitted = (w == im.width && h == im.height) ? im : resize_bilinear(im, w, h);
  const int top = int(std::nearbyint((h - size) / 2.0)), left = int(std::nearbyint((w - size) / 2.0));
  Image out;
  out.width = out.height = size;
  out.mode = im.mode;
  out.rgb.resize(size_t(size) * size * 3);
  for (int y = 0; y < size; ++y)
    std::copy_n(&fitted.rgb[(size_t(y + top) * w + left) * 3], size_t(size) * 3, &out.rgb[size_t(y) * size * 3]);
  return normalize(out, m);
}

// -------------------------------------------------------------------------------------------- the app

// One batch-1 forward pass: float32 NCHW (1, 3, H, W) → logits (classes).
using Runner = std::function<std::vector<float>(const std::vector<float>& x)>;
// Builds a Runner from the manifest and the verified artifact bytes.
using Loader = std::function<Runner(const Manifest& m, const std::string& artifact, int threads)>;

struct Options {
  std::string model;
  std::vector<std::string> images;
  int top_k = 5, threads = 1, bench = 0, warmup = 20;
  bool json = false, logits = false, allow_uncertified = false;
  std::string dump_input;  // write the preprocessed float32 tensor of the first image here (for tests)
};

inline std::string usage(const std::string& prog, const std::string& runtime) {
  return "usage: " + prog + " --model DIR [--top-k K] [--json] [--logits] [--threads N] [--bench RUNS] IMAGE.ppm ...\n"
         "\nClassify PPM/PGM images with the int8 model of a `kdq export` folder (" + runtime + ").\n"
         "Checks the artifact's sha256 against DIR/manifest.json before loading it, resizes each image exactly as\n"
         "training did (Pillow's bilinear resize, the shorter side to the model's input size, then the center\n"
         "square; stretched to the size for format-1 manifests), normalizes with the manifest's\n"
         "mean/std, and prints the top-k labels with probabilities.\n"
         "\n  --model DIR      export folder (manifest.json + model files) written by `kdq export`\n"
         "  --top-k K        labels per image (default 5)\n"
         "  --json           one JSON document on stdout\n"
         "  --logits         with --json: include the raw logits\n"
         "  --threads N      intra-op threads (default 1)\n"
         "  --bench RUNS     then time RUNS batch-1 inferences on the first image (median ms)\n"
         "  --dump-input F   write the first image's preprocessed float32 tensor (1x3xHxW) to F\n"
         "  --allow-uncertified  run an export whose certificate did not pass (rejected, not proven, --no-verify);\n"
         "                   by default only a certified export runs (`kdq-edge info` shows its gates)\n"
         "\nConvert other formats with `kdq-edge to-ppm IMAGE OUT.ppm`.\n"
         "Exit status: 0 ok; 1 an image could not be used; 2 usage; 3 the model cannot be loaded.\n";
}

inline Options parse_args(int argc, char** argv, const std::string& runtime) {
  Options o;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw UsageError(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  auto positive = [](const std::string& flag, const std::string& v) {
    char* end = nullptr;
    long n = std::strtol(v.c_str(), &end, 10);
    if (!end || *end || n < 1) throw UsageError(flag + " must be a positive integer, got '" + v + "'");
    return int(n);
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << usage(argv[0], runtime);
      std::exit(kExitOk);
    } else if (a == "--model") o.model = need(i);
    else if (a == "--top-k" || a == "-k") o.top_k = positive(a, need(i));
    else if (a == "--threads") o.threads = positive(a, need(i));
    else if (a == "--bench") o.bench = positive(a, need(i));
    else if (a == "--warmup") o.warmup = positive(a, need(i));
    else if (a == "--dump-input") o.dump_input = need(i);
    else if (a == "--json") o.json = true;
    else if (a == "--logits") o.logits = true;
    else if (a == "--allow-uncertified") o.allow_uncertified = true;
    else if (a.size() > 1 && a[0] == '-') throw UsageError("unknown option " + a);
    else o.images.push_back(a);
  }
  if (o.model.empty()) throw UsageError("--model DIR is required");
  if (o.images.empty()) throw UsageError("give at least one image");
  return o;
}

struct Ranked {
  int index;
  double probability;
};

inline std::vector<Ranked> top_k(const std::vector<float>& logits, int k) {
  double mx = *std::max_element(logits.begin(), logits.end()), sum = 0;
  std::vector<double> p(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) sum += p[i] = std::exp(double(logits[i]) - mx);
  std::vector<int> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  std::vector<Ranked> out;
  for (int r = 0; r < k && r < int(order.size()); ++r) out.push_back({order[r], p[order[r]] / sum});
  return out;
}

inline double median_ms(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  size_t n = t.size();
  return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

// The whole command line: parse, load + verify, classify every image, print; returns the exit status.
inline int run_app(int argc, char** argv, const std::string& runtime, const std::string& fmt, const Loader& loader) {
  const std::string prog = argc > 0 ? argv[0] : "classify";
  Options o;
  try {
    o = parse_args(argc, argv, runtime);
  } catch (const UsageError& e) {
    std::cerr << prog << ": error: " << e.what() << "\n\n" << usage(prog, runtime);
    return kExitUsage;
  }
  Manifest m;
  Runner run;
  try {
    m = load_manifest(o.model);
    if (m.verdict != "certified" && !o.allow_uncertified)
      throw ModelError(m.folder + ": refusing to run an uncertified export: " +
                       (m.verdict == "none" ? std::string("it was exported without a certificate (--no-verify)")
                                            : "its certificate is " + m.verdict + " (see " + m.folder + "/" +
                                                  m.certificate_file + ")") +
                       "; pass --allow-uncertified to run it anyway");
    if (m.verdict != "certified")
      std::cerr << prog << ": warning: running an uncertified export (verdict: " << m.verdict << ")\n";
    std::string artifact = verified_artifact(m, fmt);
    run = loader(m, artifact, o.threads);
  } catch (const ModelError& e) {
    std::cerr << prog << ": error: " << e.what() << "\n";
    return kExitModel;
  } catch (const std::exception& e) {
    std::cerr << prog << ": error: " << runtime << " cannot load " << m.folder << "/" << m.artifacts[fmt].file
              << " (" << e.what() << ")\n";
    return kExitModel;
  }
  std::ostringstream results, errors;
  int n_ok = 0, n_err = 0;
  std::vector<float> first_input;
  std::string first_path;
  char buf[64];
  for (const auto& path : o.images) {
    std::string mode;
    std::vector<float> x, logits;
    try {
      x = preprocess(path, m, &mode);
    } catch (const ImageError& e) {
      if (!o.json) std::cerr << prog << ": error: " << e.what() << "\n";
      errors << (n_err++ ? ",\n  " : "\n  ") << json_quote(e.what());
      continue;
    }
    if (first_input.empty()) first_input = x, first_path = path;
    try {
      logits = run(x);
    } catch (const std::exception& e) {
      std::cerr << prog << ": error: " << runtime << " failed on " << path << " (" << e.what() << ")\n";
      return kExitModel;
    }
    if (logits.size() != m.classes.size()) {
      std::cerr << prog << ": error: the model returned " << logits.size() << " logits for "
                << m.classes.size() << " classes\n";
      return kExitModel;
    }
    auto top = top_k(logits, o.top_k);
    if (o.json) {
      results << (n_ok ? ",\n  " : "\n  ") << "{\"path\": " << json_quote(path) << ", \"mode\": " << json_quote(mode)
              << ", \"top\": [";
      for (size_t r = 0; r < top.size(); ++r) {
        std::snprintf(buf, sizeof buf, "%.9g", top[r].probability);
        results << (r ? ", " : "") << "{\"index\": " << top[r].index
                << ", \"label\": " << json_quote(m.classes[top[r].index]) << ", \"probability\": " << buf << "}";
      }
      results << "]";
      if (o.logits) {
        results << ", \"logits\": [";
        for (size_t i = 0; i < logits.size(); ++i) {
          std::snprintf(buf, sizeof buf, "%.9g", double(logits[i]));  // round-trips float32 exactly
          results << (i ? ", " : "") << buf;
        }
        results << "]";
      }
      results << "}";
    } else {
      std::cout << path << (mode == "RGB" ? "" : "  (converted from " + mode + ")") << "\n";
      for (size_t r = 0; r < top.size(); ++r) {
        std::snprintf(buf, sizeof buf, "%.4f", top[r].probability);
        std::string label = m.classes[top[r].index];
        if (label.size() < 20) label.resize(20, ' ');
        std::cout << "  " << r + 1 << ". " << label << " " << buf << "\n";
      }
    }
    ++n_ok;
  }
  if (o.json) {
    std::cout << "{\"model\": {\"folder\": " << json_quote(m.folder) << ", \"runtime\": " << json_quote(runtime)
              << ", \"artifact_sha256\": " << json_quote(m.artifacts[fmt].sha256) << "},\n \"results\": ["
              << results.str() << (n_ok ? "\n ]" : "]") << ",\n \"errors\": [" << errors.str()
              << (n_err ? "\n ]" : "]") << "}\n";
  }
  if (!o.dump_input.empty() && !first_input.empty()) {
    std::ofstream f(o.dump_input, std::ios::binary);
    f.write(reinterpret_cast<const char*>(first_input.data()), std::streamsize(first_input.size() * sizeof(float)));
  }
  if (o.bench && !first_input.empty()) {
    using clock = std::chrono::steady_clock;
    auto ms = [](clock::time_point a, clock::time_point b) {
      return std::chrono::duration<double, std::milli>(b - a).count();
    };
    for (int i = 0; i < o.warmup; ++i) run(first_input);
    std::vector<double> model_t, e2e_t;
    for (int i = 0; i < o.bench; ++i) {
      auto t0 = clock::now();
      run(first_input);
      model_t.push_back(ms(t0, clock::now()));
    }
    for (int i = 0; i < o.bench; ++i) {
      auto t0 = clock::now();
      auto top = top_k(run(preprocess(first_path, m)), 1);
      e2e_t.push_back(ms(t0, clock::now()));
    }
    std::fprintf(stderr, "bench %s: threads %d batch 1 runs %d  model_ms %.3f  end_to_end_ms %.3f\n",
                 runtime.c_str(), o.threads, o.bench, median_ms(model_t), median_ms(e2e_t));
  }
  return n_err ? kExitImages : kExitOk;
}

}  // namespace kdq_edge
