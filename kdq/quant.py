"""int8 quantization behind one small interface, so the flow can change without touching training or export.

Two flows (`FLOWS`), each a `Flow` with the same five methods, chosen per export target (`export/*.toml`):
- "eager" (`torch.ao.quantization`): converts to int8 modules; exports TorchScript (real int8, loadable from
  C++) and ONNX through the legacy exporter. Default of the x86 and arm targets.
- "pt2e" (`torch.export` + torchao, `kdq.pt2e`): converts to a Q/DQ graph; exports ONNX through the dynamo
  exporter, a `torch.export` program (.pt2) and ExecuTorch (.pte). Targets x86-pt2e and mobile.

Why each default (side by side, same float student, README "Two quantization flows"): on x86 both flows put
every convolution in a QLinearConv in ONNX Runtime at the same accuracy and the same ORT speed. Eager is the x86
default because it alone ships a real int8 TorchScript file, which the C++ libtorch app runs (a PT2E .pt2 runs
Q/DQ in float in PyTorch, ~45x slower than ORT at batch 1). Its ONNX file used to drift from PyTorch int8 (2.34%
of Fashion-MNIST's 10,000 test predictions flipped, and the certificate rejected it) because torch's legacy
exporter truncates each bias to its int32 grid while PyTorch's kernels add it unrounded: `biases_on_onnx_grid`
makes both add the same rounded bias, and the flips fell to 0.14% (results/certificates-fashion-mnist/).
Everything eager stands on is deprecated in torch 2.15 (pytorch/ao#2259), and
tests/test_pt2e.py fails loudly when torch drops it. For phones and boards the PT2E flow is the only one:
ExecuTorch lowers only PT2E models, so `mobile` uses it.

x86 activations are 7-bit (0..127) by default: CPUs without VNNI (AVX2, most x86 edge devices) add pairs
of u8 x s8 products in a saturating int16, and 8-bit activations overflow it (`kdq.cpu`). With 7-bit
activations every pair stays below 32,767 on every x86 kernel, so one model is exact on VNNI and AVX2 alike;
measured in bench/results/int8_paths.json (README "int8 on every x86 CPU"). QNNPACK (ARM) keeps 8 bits.
The PT2E x86 flow gets the same guarantee from the other operand: 8-bit activations with 7-bit weights
(-64..63), since the dynamo exporter writes per-tensor QuantizeLinear without the activation range (onnxscript
drops quant_min/quant_max: ORT would quantize to 0..255 where PyTorch used 0..127); 2 * 255 * 64 = 32,640 fits.

Checkpoints never hold packed int8 modules: they hold the *prepared* model's state (float weights plus
observer / fake-quant statistics), which loads with `weights_only=True`, and `int8_model` converts it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.ao import quantization as tq

from kdq import pt2e
from kdq.checkpoint import ARCH, MODEL, CheckpointError, input_size
from kdq.config import FLOW_BACKENDS
from kdq.cpu import quantized_engine
from kdq.models import build_model

QUANTIZATION = "quantization"  # checkpoint key: {"flow", "backend", "mode", ...}
FLOAT_MODEL = "float_model"  # checkpoint key: the float weights the int8 model came from (or None)


@dataclass(frozen=True)
class Scheme:
    """The integer ranges of an int8 model, recorded in its checkpoint (`quantization.scheme`)."""

    activation_bits: int = 8  # u8 activations use 0..2**bits-1; 7 keeps AVX2's int16 pair sums exact
    weight_bits: int = 8  # symmetric s8 weights use -2**(bits-1)..2**(bits-1)-1

    def __post_init__(self):
        if not (2 <= self.activation_bits <= 8 and 2 <= self.weight_bits <= 8):
            raise ValueError(f"int8 scheme bits must be 2..8, got {self}")


# (activation bits, weight bits) by (flow, backend); why 7-bit on x86: module docstring.
DEFAULT_BITS = {("eager", "x86"): (7, 8), ("eager", "qnnpack"): (8, 8), ("pt2e", "x86"): (8, 7),
                ("pt2e", "xnnpack"): (8, 8)}  # fmt: skip


def default_scheme(
    backend: str, activation_bits: int | None = None, weight_bits: int | None = None, flow: str = "eager"
) -> Scheme:
    default_a, default_w = DEFAULT_BITS.get((flow, backend), (8, 8))
    return Scheme(activation_bits or default_a, weight_bits or default_w)


class Flow(Protocol):
    name: str
    # Does PyTorch itself run the converted model with int8 kernels? (Then the certificate also runs PyTorch
    # on the emulated-AVX2 path; a PT2E model is Q/DQ computed in float by PyTorch, int8 only in ORT/ExecuTorch.)
    int8_kernels_in_pytorch: bool

    def prepare(
        self, model: nn.Module, backend: str, qat: bool, scheme: Scheme | None = None, image_size: int = 32
    ) -> nn.Module: ...
    def qat_epoch_hook(self, model: nn.Module, epoch: int, epochs: int, freeze_bn: float, freeze_obs: float): ...
    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None: ...
    def convert(self, prepared: nn.Module, backend: str, engine: str | None = None) -> nn.Module: ...
    def check_available(self, backend: str) -> None: ...


class EagerFlow:
    """Fuse conv-bn(-relu), insert observers/fake-quant, convert to `torch.ao.nn.quantized` modules."""

    name = "eager"
    int8_kernels_in_pytorch = True

    def qconfig(self, qat: bool, scheme: Scheme) -> tq.QConfig:
        """The same qconfig serves both engines; only the kernels (and their weight packing) differ.

        Per-channel weights, also on QNNPACK (whose own default is per-tensor): after BN folding, one
        depthwise filter of the smoke student was ~5,700x larger than the median one, a single per-tensor
        scale rounded the others to zero, and PTQ accuracy fell from 95% to 10%. Activation and weight
        ranges come from `scheme` (x86: 7-bit activations, see the module docstring).
        """
        act_range = {"quant_min": 0, "quant_max": 2**scheme.activation_bits - 1, "reduce_range": False}
        w = 2 ** (scheme.weight_bits - 1)
        w_range = {"quant_min": -w, "quant_max": w - 1, "dtype": torch.qint8, "qscheme": torch.per_channel_symmetric}
        if qat:
            act = tq.FusedMovingAvgObsFakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, **act_range)
            weight = tq.FusedMovingAvgObsFakeQuantize.with_args(
                observer=tq.MovingAveragePerChannelMinMaxObserver, **w_range
            )
            return tq.QConfig(activation=act, weight=weight)
        act = tq.HistogramObserver.with_args(**act_range)
        return tq.QConfig(activation=act, weight=tq.PerChannelMinMaxObserver.with_args(**w_range))

    def check_available(self, backend: str) -> None:
        check_backend(self.name, backend)
        if backend not in torch.backends.quantized.supported_engines:
            raise RuntimeError(
                f"this PyTorch build has no {backend} quantized engine "
                f"(has: {', '.join(torch.backends.quantized.supported_engines)})"
            )

    def prepare(
        self, model: nn.Module, backend: str, qat: bool, scheme: Scheme | None = None, image_size: int = 32
    ) -> nn.Module:
        """`image_size` does not apply: eager modules take any input size."""
        self.check_available(backend)
        torch.backends.quantized.engine = backend
        model = copy.deepcopy(model).train(qat)
        model.fuse_model(is_qat=qat)
        model.qconfig = self.qconfig(qat, scheme or default_scheme(backend))
        # The classifier stays float (dequantize happens before it): an int8 classifier puts logits on a
        # coarse grid, and ties between runtimes then cost parity.
        model.classifier.qconfig = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            return tq.prepare_qat(model) if qat else tq.prepare(model)

    def qat_epoch_hook(self, model: nn.Module, epoch: int, epochs: int, freeze_bn: float, freeze_obs: float):
        """Standard QAT schedule: BN statistics, then quantization ranges, stop moving late in training."""
        if epoch >= round(freeze_bn * epochs):
            model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
        if epoch >= round(freeze_obs * epochs):
            model.apply(tq.disable_observer)

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        model.eval()
        for x in batches:
            model(x)

    def convert(self, prepared: nn.Module, backend: str, engine: str | None = None) -> nn.Module:
        self.check_available(backend)
        torch.backends.quantized.engine = engine or backend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation + "must run observer" for unused skip-add observers
            return biases_on_onnx_grid(tq.convert(copy.deepcopy(prepared).eval().cpu()))


def int8_convolutions(model: nn.Module) -> dict[str, nn.Module]:
    """An eager int8 model's quantized convolutions (fused conv-relu counts once), in execution order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)}


@torch.no_grad()
def biases_on_onnx_grid(model: nn.Module) -> nn.Module:
    """Put every int8 convolution's float bias on ONNX's int32 grid (input scale x weight scale), in place.

    PyTorch's int8 kernels add the float bias as it is; ONNX's QLinearConv takes it in int32 accumulator units,
    and torch's legacy exporter converts it with a Cast, which *truncates* toward zero: up to one accumulator unit
    lost on every output channel, the same sign for a whole channel, and 2 output LSB where a BN-folded channel's
    accumulator unit is 1.97 LSB. On Fashion-MNIST's student ONNX Runtime flipped 2.34% of the 10,000 test
    predictions against PyTorch int8, and the certificate rejected the export; with one bias, 1.23%. Here each
    bias becomes the nearest grid point (plus 1/100 unit away from zero), nudged by float32 ulps until the
    exporter's truncation lands on that same point: TorchScript and ONNX then add the same rounded (not truncated)
    bias, to within 1/100 of a unit.
    """
    convs = int8_convolutions(model)
    input_scales: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda _, i, o, n=n: input_scales.__setitem__(n, i[0].q_scale()))
             for n, m in convs.items()]  # fmt: skip
    try:
        model(torch.zeros(1, 3, 32, 32))  # input scales are static: any image reaches every convolution
    finally:
        for h in hooks:
            h.remove()
    for name, conv in convs.items():
        weight, bias = conv.weight(), conv.bias()
        if bias is None or name not in input_scales:
            continue
        per_channel = weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        scales = weight.q_per_channel_scales() if per_channel else torch.tensor([weight.q_scale()])
        unit = input_scales[name] * scales.double()
        units = torch.round(bias.double() / unit)
        snapped = (units * unit).float()
        unit32 = torch.tensor(input_scales[name], dtype=torch.float32) * scales.float()
        for _ in range(8):  # a few ulps at most; the exporter may divide in float64 or float32: hold both
            short = (torch.trunc(snapped.double() / unit) != units) | (torch.trunc(snapped / unit32) != units)
            if not short.any():
                break
            snapped = torch.where(short, torch.nextafter(snapped, snapped.sign() * torch.inf), snapped)
        conv.set_weight_bias(weight, snapped)
    return model


FLOAT_LAYERS = "float_layers"  # quantization record: {layer: {"scale", "zero_point"}} computed in float (kdq.repair)


class FloatIsland(nn.Module):
    """One layer of an eager int8 model computed in float: dequantize its input, run the float layer (BN folded),
    quantize its output onto its own grid. Downstream int8 layers read that grid from the tensor, as they read any
    input's. TorchScript scripts it; the ONNX exporter writes DequantizeLinear, Mul, Conv, QuantizeLinear, and ONNX
    Runtime runs a float Conv (the kernel gate expects exactly these).

    Why the Mul: ONNX Runtime's WeightBiasQuantization pass turns a float Conv fed straight by a DequantizeLinear
    into a QLinearConv with *per-tensor* int8 weights, coarser than the per-channel layer being repaired. Input x 2
    into a conv with halved weights computes the same, exactly (powers of two), and keeps that pass away.
    """

    def __init__(self, layer: nn.Module, scale: float, zero_point: int):
        super().__init__()
        conv = layer[0] if isinstance(layer, nn.Sequential) else layer  # fused conv-relu: the conv comes first
        with torch.no_grad():
            conv.weight.mul_(0.5)
        self.layer, self.scale, self.zero_point = layer, float(scale), int(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(self.layer(x.dequantize() * 2.0), self.scale, self.zero_point, torch.quint8)


def float_layer(prepared: nn.Module, name: str) -> nn.Module:
    """The float module of a prepared (QAT or observed) layer: BN folded into the conv, no fake-quant, no observer."""
    module = prepared.get_submodule(name)
    if hasattr(module, "to_float"):  # QAT: conv-bn(-relu) with frozen statistics folds into one float conv
        return module.to_float().eval()
    module = copy.deepcopy(module).eval()  # PTQ: already fused; drop the observer and its hook
    module._forward_hooks.clear()
    del module.activation_post_process
    return module


def replace_layer(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """Put `layer` at `name` in `model`; returns the module it replaced."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, layer)
    return old


def with_float_layers(model: nn.Module, prepared: nn.Module, grids: dict[str, dict]) -> nn.Module:
    """An eager int8 model with the layers of `grids` ({name: {"scale", "zero_point"}}) computed in float."""
    for name, grid in grids.items():
        replace_layer(model, name, FloatIsland(float_layer(prepared, name), grid["scale"], grid["zero_point"]))
    return biases_on_onnx_grid(model)  # a layer after an island reads a new input scale: its bias grid moved


class Pt2eFlow:
    """torch.export + torchao's prepare/convert (`kdq.pt2e`): backends x86 and xnnpack (ExecuTorch)."""

    name = "pt2e"
    int8_kernels_in_pytorch = False

    def check_available(self, backend: str) -> None:
        check_backend(self.name, backend)
        pt2e.check_installed(backend)

    def prepare(
        self, model: nn.Module, backend: str, qat: bool, scheme: Scheme | None = None, image_size: int = 32
    ) -> nn.Module:
        """`image_size`: torch.export specializes the graph to the example's height and width."""
        self.check_available(backend)
        scheme = scheme or default_scheme(backend, flow=self.name)
        return pt2e.prepare(model, backend, qat, scheme.activation_bits, scheme.weight_bits, image_size)

    def qat_epoch_hook(self, model: nn.Module, epoch: int, epochs: int, freeze_bn: float, freeze_obs: float):
        """The eager flow's schedule, on the graph: batch norm, then the quantization ranges, stop moving."""
        if epoch >= round(freeze_bn * epochs):
            pt2e.freeze_bn_stats(model)
        if epoch >= round(freeze_obs * epochs):
            pt2e.disable_observers(model)

    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        pt2e.calibrate(model, batches)

    def convert(self, prepared: nn.Module, backend: str, engine: str | None = None) -> nn.Module:
        """`engine` does not apply: the Q/DQ graph is computed in float by PyTorch (exactly what ORT and
        ExecuTorch compute in integers, up to rounding); its int8 kernels run in those runtimes."""
        self.check_available(backend)
        return pt2e.convert(prepared)


FLOWS: dict[str, Flow] = {"eager": EagerFlow(), "pt2e": Pt2eFlow()}


def check_backend(flow: str, backend: str) -> None:
    if backend not in FLOW_BACKENDS[flow]:
        other = [f for f, backends in FLOW_BACKENDS.items() if backend in backends]
        hint = f" (backend {backend} is the {other[0]} flow's: --flow {other[0]})" if other else ""
        raise ValueError(
            f"the {flow} flow has no backend {backend!r}; choose from: {', '.join(FLOW_BACKENDS[flow])}{hint}"
        )


def get_flow(name: str) -> Flow:
    try:
        return FLOWS[name]
    except KeyError:
        raise ValueError(f"unknown quantization flow {name!r}; choose from: {', '.join(FLOWS)}") from None


def is_quantized(ckpt: dict[str, Any]) -> bool:
    return QUANTIZATION in ckpt


def prepared_from_checkpoint(ckpt: dict[str, Any], path: Any = "checkpoint") -> nn.Module:
    """Rebuild the prepared (observed / fake-quant) model a quantized checkpoint holds."""
    q, arch = ckpt[QUANTIZATION], ckpt[ARCH]
    model = build_model(arch["name"], arch["num_classes"], **arch.get("kwargs", {}))
    qat, scheme = q["mode"] == "qat", checkpoint_scheme(ckpt)
    prepared = get_flow(q["flow"]).prepare(model, q["backend"], qat=qat, scheme=scheme, image_size=input_size(ckpt))
    try:
        prepared.load_state_dict(ckpt[MODEL])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: quantized weights do not fit {arch['name']} ({str(e).splitlines()[0]})") from e
    return prepared.eval()


def qat_float_forward(ckpt: dict[str, Any]) -> nn.Module | None:
    """A QAT checkpoint's own float forward: its trained model with every fake-quant and observer off. int8 against
    it is what the int8 arithmetic itself costs; against `float_reference`, what QAT training and int8 changed
    together (fine-tuning moves decision boundaries). None for a PTQ checkpoint: its float forward is the float
    model's."""
    if ckpt[QUANTIZATION]["mode"] != "qat":
        return None
    model = prepared_from_checkpoint(ckpt)
    for module in model.modules():  # torch.ao's and torchao's fake-quant modules both have these switches
        for switch in ("disable_fake_quant", "disable_observer"):
            if callable(getattr(module, switch, None)):
                getattr(module, switch)()
    return model


def checkpoint_scheme(ckpt: dict[str, Any]) -> Scheme:
    """The scheme a quantized checkpoint was made with (checkpoints from before schemes used 8/8 bits)."""
    return Scheme(**ckpt[QUANTIZATION].get("scheme", {}))


def int8_model(ckpt: dict[str, Any], path: Any = "checkpoint", engine: str | None = None) -> nn.Module:
    """The int8 model of a quantized checkpoint (eval mode, CPU, engine set to its backend).

    `engine` packs the weights for another quantized engine of the same backend: "fbgemm" is what the x86
    engine runs on CPUs without VNNI (on VNNI CPUs it sends most convolutions to oneDNN), so together with
    `kdq.cpu.AVX2_ENV` it reproduces an AVX2-only machine's int8 arithmetic on any x86 CPU. By default, the
    engine of kdq's CPU identity (`kdq.cpu.quantized_engine`: fbgemm for x86 under `KDQ_CPU=avx2`).
    """
    if not is_quantized(ckpt):
        raise CheckpointError(
            f"{path} is a float checkpoint; quantize it first (`kdq quantize` or `kdq distill --qat`)"
        )
    q = ckpt[QUANTIZATION]

    def convert() -> nn.Module:
        chosen = engine or quantized_engine(q["backend"])
        prepared = prepared_from_checkpoint(ckpt, path)
        model = get_flow(q["flow"]).convert(prepared, q["backend"], chosen)
        return with_float_layers(model, prepared, q[FLOAT_LAYERS]) if q.get(FLOAT_LAYERS) else model

    if q["flow"] == "pt2e" and isinstance(path, Path) and path.is_file():
        from kdq.pt2e_export import cached_int8

        return cached_int8(path, convert, input_size(ckpt))
    return convert()


def float_reference(ckpt: dict[str, Any]) -> nn.Module | None:
    """The float model a quantized checkpoint came from, when it recorded one (eval mode)."""
    if ckpt.get(FLOAT_MODEL) is None:
        return None
    arch = ckpt[ARCH]
    model = build_model(arch["name"], arch["num_classes"], **arch.get("kwargs", {}))
    model.load_state_dict(ckpt[FLOAT_MODEL])
    return model.eval()
