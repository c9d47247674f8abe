// kdq-classify-torch: classify PPM/PGM images with the TorchScript int8 model (model.pt) of a `kdq export`
// folder, using the libtorch that ships in the torch wheel. See kdq_edge.hpp for the shared command line.
#include <ATen/Parallel.h>
#include <torch/script.h>

#include "kdq_edge.hpp"

namespace {

// libtorch warns at every load that quantized tensors are deprecated (pytorch#184982; kdq's quantization
// notes): known and harmless for running an exported model, so that one warning is dropped.
class Warnings : public c10::WarningHandler {
 public:
  void process(const c10::Warning& w) override {
    const std::string& msg = w.msg();
    if (msg.find("quantize_per_tensor") != std::string::npos && msg.find("deprecated") != std::string::npos) return;
    std::cerr << "libtorch warning: " << msg << "\n";
  }
};

// The quantized engine the int8 model was converted for (manifest quantization.backend); libtorch's own
// default on x86 is the same "x86" engine, but an arm export (qnnpack) needs it set explicitly.
void set_engine(const std::string& backend) {
  static const std::map<std::string, at::QEngine> engines = {
      {"x86", at::QEngine::X86}, {"fbgemm", at::QEngine::FBGEMM}, {"qnnpack", at::QEngine::QNNPACK},
      {"onednn", at::QEngine::ONEDNN}};
  auto it = engines.find(backend);
  if (backend.empty()) return;
  if (it == engines.end()) throw std::runtime_error("unknown quantization backend '" + backend + "' in the manifest");
  const auto& supported = at::globalContext().supportedQEngines();
  if (std::find(supported.begin(), supported.end(), it->second) == supported.end())
    throw std::runtime_error("this libtorch has no '" + backend + "' quantized engine");
  at::globalContext().setQEngine(it->second);
}

kdq_edge::Runner load(const kdq_edge::Manifest& m, const std::string& artifact, int threads) {
  static Warnings warnings;
  c10::WarningUtils::set_warning_handler(&warnings);
  at::set_num_threads(threads);
  at::set_num_interop_threads(1);
  set_engine(m.backend);
  std::istringstream in(artifact);  // the verified bytes, not the file again
  auto module = std::make_shared<torch::jit::Module>(torch::jit::load(in, torch::kCPU));
  module->eval();
  const int64_t h = m.height, w = m.width;
  return [module, h, w](const std::vector<float>& x) {
    c10::InferenceMode guard;
    auto input = torch::from_blob(const_cast<float*>(x.data()), {1, 3, h, w}, torch::kFloat32);
    at::Tensor out = module->forward({input}).toTensor().to(torch::kFloat32).contiguous();
    return std::vector<float>(out.data_ptr<float>(), out.data_ptr<float>() + out.numel());
  };
}

}  // namespace

int main(int argc, char** argv) { return kdq_edge::run_app(argc, argv, "libtorch", "torchscript", load); }
