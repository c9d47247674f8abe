"""The PT2E flow (torchao): `torch.export` the float model, annotate it with a backend's quantizer, insert
observers / fake-quant (`prepare_pt2e` / `prepare_qat_pt2e`), and convert to a Q/DQ graph (`convert_pt2e`).

This is where PyTorch's int8 story goes next (eager `torch.ao.quantization` is deprecated, pytorch/ao#2259):
the converted graph exports to ONNX through the dynamo exporter and lowers to ExecuTorch (`kdq.pt2e_export`).
Backends choose the quantizer: "x86" uses torchao's X86InductorQuantizer, "xnnpack" (ARM phones and boards
through ExecuTorch) ExecuTorch's XNNPACKQuantizer. Same `Flow` methods as `kdq.quant.EagerFlow`.

Three things the quantizers do not do by themselves, and kdq does here:
- x86 residual adds: X86InductorQuantizer treats conv→bn→add as one fused Inductor op and leaves the conv's
  output unquantized; ONNX Runtime then runs those convolutions (10 of MobileNetV2's 52) in fp32. kdq also
  quantizes every input of an annotated add, so ORT fuses every conv into QLinearConv and every add into
  QLinearAdd (the certificate's int8-kernel gate proves it).
- train()/eval(): a prepared GraphModule refuses them; kdq maps them to torchao's graph rewrites (dropout and
  batch norm) so the shared `fit` loop and evaluation work unchanged, and a frozen batch norm stays frozen.
- Checkpoints hold the prepared model's state_dict (tensors only, `weights_only=True`); loading re-exports the
  float architecture and prepares it again with the same quantizer, which gives the same graph and keys.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import warnings
from collections.abc import Iterable

import torch
from torch import nn

EXAMPLE_BATCH = 2  # torch.export specializes a dimension of size 0 or 1: the example batch must be >= 2
BN_FROZEN = "_kdq_bn_frozen"  # GraphModule attribute: QAT froze batch-norm statistics (kept across train())
BATCH_NORMS = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default", "aten.cudnn_batch_norm.default")


def example_input(image_size: int = 32, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size)


def dynamic_batch(max_batch: int | None = None) -> tuple[dict[int, torch.export.Dim]]:
    """The batch dimension is dynamic; ExecuTorch plans memory for an upper bound, so it passes one."""
    dim = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
    return ({0: dim},)


def check_installed(backend: str) -> None:
    """The libraries the backend's quantizer comes from (which backends the flow has: `kdq.quant.check_backend`)."""
    try:
        import torchao.quantization.pt2e  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the pt2e flow needs torchao (`uv sync` installs it): {e}") from e
    if backend == "xnnpack":
        try:
            import executorch.backends.xnnpack.quantizer.xnnpack_quantizer  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                f"backend xnnpack needs ExecuTorch's quantizer: install the extra `kdq[executorch]` ({e})"
            ) from e


def quantizer(backend: str, qat: bool, activation_bits: int, weight_bits: int, head: str = "classifier"):
    """The backend's quantizer with kdq's ranges; the classifier (module path `head`) stays float (as in the
    eager flow)."""
    if backend == "x86":
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            get_default_x86_inductor_quantization_config,
        )

        config = get_default_x86_inductor_quantization_config(is_qat=qat)
        w = 2 ** (weight_bits - 1)
        config = dataclasses.replace(
            config,
            input_activation=dataclasses.replace(config.input_activation, quant_max=2**activation_bits - 1),
            output_activation=dataclasses.replace(config.output_activation, quant_max=2**activation_bits - 1),
            weight=dataclasses.replace(config.weight, quant_min=-w, quant_max=w - 1),
        )
        return _x86_quantizer_class()().set_global(config).set_module_name_qconfig(head, None)
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    a, w = 2 ** (activation_bits - 1), 2 ** (weight_bits - 1)
    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, act_qmin=-a, act_qmax=a - 1,
                                               weight_qmin=-(w - 1), weight_qmax=w - 1)  # fmt: skip
    return _xnnpack_quantizer_class()(head).set_global(config)


def _xnnpack_quantizer_class():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    class FloatClassifierXNNPACKQuantizer(XNNPACKQuantizer):
        """XNNPACKQuantizer with the classifier left float: its `set_module_name(name, None)` is unsupported."""

        def __init__(self, head: str):
            super().__init__()
            self.head = head

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            for node in model.graph.nodes:
                stack = node.meta.get("nn_module_stack", {}).values()
                if any(path == self.head or path.startswith(self.head + ".") for path, _ in stack):
                    node.meta.pop("quantization_annotation", None)
            return model

    return FloatClassifierXNNPACKQuantizer


def _x86_quantizer_class():
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    class OrtX86Quantizer(X86InductorQuantizer):
        """X86InductorQuantizer that also quantizes the conv output feeding a residual add (module docstring)."""

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            for node in model.graph.nodes:
                ann = node.meta.get("quantization_annotation")
                if node.target != torch.ops.aten.add.Tensor or ann is None:
                    continue
                act = ann.output_qspec or next(iter(ann.input_qspec_map.values()), None)
                if act is None:
                    continue
                for arg in node.args:
                    if isinstance(arg, torch.fx.Node) and arg not in ann.input_qspec_map:
                        ann.input_qspec_map[arg] = act
                ann.output_qspec = act  # QLinearAdd needs a quantize after the add too
            return model

    return OrtX86Quantizer


def prepare(
    model: nn.Module, backend: str, qat: bool, activation_bits: int, weight_bits: int, image_size: int = 32
) -> nn.Module:
    """Export the float model (train mode for QAT: conv-bn fusion needs training batch norm) and prepare it."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    check_installed(backend)
    model = copy.deepcopy(model).cpu().train(qat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = example_input(image_size)
        graph = torch.export.export(model, (x,), dynamic_shapes=dynamic_batch()).module()
        q = quantizer(backend, qat, activation_bits, weight_bits, getattr(model, "head_name", "classifier"))
        prepared = prepare_qat_pt2e(graph, q) if qat else prepare_pt2e(graph, q)
    _allow_train_eval(prepared)
    return prepared.train(qat)


def _allow_train_eval(model: torch.fx.GraphModule) -> None:
    """`model.train(mode)` / `model.eval()` rewrite the graph's dropout and batch norm (torchao), set
    `.training` like any module, and keep batch norm frozen once `freeze_bn_stats` froze it."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    def train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        if mode and getattr(self, BN_FROZEN, False):
            _set_batch_norm_training(self, False)
        for m in self.modules():
            m.training = mode
        return self

    model.train = types.MethodType(train, model)  # type: ignore[method-assign]
    model.eval = types.MethodType(lambda self: self.train(False), model)  # type: ignore[method-assign]


def _set_batch_norm_training(model: torch.fx.GraphModule, training: bool) -> None:
    for node in model.graph.nodes:
        if str(node.target) in BATCH_NORMS:
            args = list(node.args)
            args[5] = training  # (input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
            node.args = tuple(args)
    model.recompile()


def freeze_bn_stats(model: torch.fx.GraphModule) -> None:
    """Normalize with the running statistics from now on (eager: `freeze_bn_stats`), also after train()."""
    setattr(model, BN_FROZEN, True)
    _set_batch_norm_training(model, False)


def disable_observers(model: nn.Module) -> None:
    from torchao.quantization.pt2e import disable_observer

    model.apply(disable_observer)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    model.eval()
    for x in batches:
        model(x.contiguous())


def convert(prepared: nn.Module) -> torch.fx.GraphModule:
    """The Q/DQ int8 graph (batch norm folded into the convolutions, weights stored as int8)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    model = copy.deepcopy(prepared).cpu()
    _allow_train_eval(model)  # bound to the copy, whatever deepcopy kept
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_pt2e(model)
    _drop_unused_tensors(converted)
    return inference_only(converted)


def inference_only(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A converted (or torch.export-loaded) int8 graph is eval-only: batch norm is folded, dropout gone. Its
    train()/eval() refuse by default; here they are accepted and change nothing, as callers expect of a module."""
    model.train = types.MethodType(lambda self, mode=True: self, model)  # type: ignore[method-assign]
    model.eval = types.MethodType(lambda self: self, model)  # type: ignore[method-assign]
    return model


def _drop_unused_tensors(model: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the float weights and BN statistics registered beside their folded int8 copies:
    dropped, the .pt2 shrinks from 12.7 MB to the int8 model's size."""
    used = {node.target for node in model.graph.nodes if node.op == "get_attr"}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(model.get_submodule(owner), attr)
    model.delete_all_unused_submodules()


def count_convs(model: torch.fx.GraphModule) -> int:
    return sum(node.target == torch.ops.aten.conv2d.default for node in model.graph.nodes)
