"""Every quantized convolution of an eager int8 checkpoint, run on a batch: its int8 input and output, saved to
an .npz (`python -m tests.int8_layers CHECKPOINT X.npy OUT.npz`). A process of its own, so that the int8 path
is the one its environment chooses (`KDQ_CPU=avx2`: fbgemm's saturating AVX2 kernels), and a reference that
computes each convolution in exact integer arithmetic (`exact_conv`) to hold it to."""

from __future__ import annotations

import sys

import numpy as np
import torch

CONVS = (torch.ao.nn.quantized.Conv2d,)  # ConvReLU2d is a subclass


def quantized_convs(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CONVS)}


def record(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """{NAME.x, NAME.x_scale, NAME.x_zero_point, NAME.y} for every quantized convolution, on input `x`."""
    seen: dict[str, np.ndarray] = {}

    def hook(name):
        def save(module, inputs, output):
            (q,) = inputs
            seen[f"{name}.x"] = q.int_repr().numpy()
            seen[f"{name}.x_scale"] = np.float64(q.q_scale())
            seen[f"{name}.x_zero_point"] = np.int64(q.q_zero_point())
            seen[f"{name}.y"] = output.int_repr().numpy()

        return save

    handles = [m.register_forward_hook(hook(n)) for n, m in quantized_convs(model).items()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def exact_conv(module: torch.nn.Module, x: np.ndarray, x_scale: float, x_zero_point: int) -> np.ndarray:
    """The convolution's u8 output computed with exact integer sums (float64 holds them exactly), then requantized
    as the int8 kernels do: round(acc * x_scale * w_scale / y_scale + bias / y_scale) + zero point, clamped."""
    w = module.weight()
    wq = w.int_repr().double() - w.q_per_channel_zero_points().double().view(-1, 1, 1, 1)
    acc = torch.nn.functional.conv2d(torch.from_numpy(x).double() - int(x_zero_point), wq, None, module.stride,
                                     module.padding, module.dilation, module.groups)  # fmt: skip
    scale = float(x_scale) * w.q_per_channel_scales().double().view(1, -1, 1, 1)
    bias = module.bias()
    y = acc * scale + (0 if bias is None else bias.double().view(1, -1, 1, 1))
    q = torch.round(y / module.scale) + module.zero_point
    low = module.zero_point if isinstance(module, torch.ao.nn.intrinsic.quantized.ConvReLU2d) else 0
    return q.clamp(low, 255).to(torch.int64).numpy()


def main(argv: list[str]) -> None:
    from kdq.checkpoint import load_checkpoint
    from kdq.quant import int8_model

    checkpoint, x_path, out = argv
    model = int8_model(load_checkpoint(checkpoint), checkpoint, engine="fbgemm")
    np.savez(out, **record(model, torch.from_numpy(np.load(x_path))))


if __name__ == "__main__":
    main(sys.argv[1:])
