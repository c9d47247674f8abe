// kdq-classify-ort: classify PPM/PGM images with the int8 ONNX model (model.onnx) of a `kdq export` folder,
// using ONNX Runtime's C++ API. See kdq_edge.hpp for the shared command line.
#include <onnxruntime_cxx_api.h>

#include "kdq_edge.hpp"

namespace {

kdq_edge::Runner load(const kdq_edge::Manifest& m, const std::string& artifact, int threads) {
  static Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "kdq-edge");
  Ort::SessionOptions opts;
  opts.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);  // as kdq's parity check
  opts.SetIntraOpNumThreads(threads);
  opts.SetInterOpNumThreads(1);
  for (const auto& [key, value] : m.onnxruntime_config) opts.AddConfigEntry(key.c_str(), value.c_str());
  // From the verified bytes, not the file again.
  auto session = std::make_shared<Ort::Session>(env, artifact.data(), artifact.size(), opts);
  if (session->GetInputCount() != 1 || session->GetOutputCount() != 1)
    throw std::runtime_error("expected one input and one output");
  Ort::AllocatorWithDefaultOptions alloc;
  if (session->GetInputNameAllocated(0, alloc).get() != m.input_name)
    throw std::runtime_error("input name differs from the manifest's " + m.input_name);
  auto names = std::make_shared<std::pair<std::string, std::string>>(m.input_name, m.output_name);
  const std::array<int64_t, 4> shape = {1, 3, m.height, m.width};
  auto memory = std::make_shared<Ort::MemoryInfo>(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault));
  return [session, names, shape, memory](const std::vector<float>& x) {
    Ort::Value input = Ort::Value::CreateTensor<float>(*memory, const_cast<float*>(x.data()), x.size(),
                                                       shape.data(), shape.size());
    const char* in_names[] = {names->first.c_str()};
    const char* out_names[] = {names->second.c_str()};
    auto out = session->Run(Ort::RunOptions{nullptr}, in_names, &input, 1, out_names, 1);
    const float* p = out[0].GetTensorData<float>();
    return std::vector<float>(p, p + out[0].GetTensorTypeAndShapeInfo().GetElementCount());
  };
}

}  // namespace

int main(int argc, char** argv) { return kdq_edge::run_app(argc, argv, "onnxruntime", "onnx", load); }
