"""`kdq-edge`: classify images with a `kdq export` folder, without PyTorch.

Examples:
  kdq-edge classify --model export-x86 cat.png dog.jpg
  kdq-edge classify --model export-x86 photos/ --top-k 3 --json > predictions.json
  kdq-edge info --model export-x86
  kdq-edge to-ppm cat.png cat.ppm             # for the C++ apps (deploy/edge/cpp)
  kdq-edge bench --model export-x86 --threads 1

Only a certified export runs: one whose `kdq export` certificate passed every gate (`info` shows them).
A rejected or not-proven export, or one exported with --no-verify, needs --allow-uncertified.

Exit status: 0 all images classified; 1 some images could not be used (the others are still printed);
2 usage error; 3 the model cannot be loaded (no manifest, sha256 mismatch, uncertified, ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from kdq_edge import __version__
from kdq_edge.errors import EdgeError, ImageError
from kdq_edge.image import ALPHA_POLICIES, load_image, write_ppm
from kdq_edge.manifest import CERTIFIED, Manifest, load_manifest, verified_bytes
from kdq_edge.model import FORMATS, EdgeModel, Result

EXIT_OK, EXIT_IMAGES, EXIT_USAGE, EXIT_MODEL = 0, 1, 2, 3


def image_files(inputs: Sequence[str]) -> list[Path]:
    """Files as given; folders expanded to their image files (by extension, recursively, sorted)."""
    known = {ext.lower() for ext in Image.registered_extensions()}
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in known)
        else:
            paths.append(item)
    return paths


class Progress:
    """A one-line progress bar on stderr (no dependency): `classify  37/120 [=====>     ] 31% 52 img/s`."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled and total > 0, width
        self.done, self.start = 0, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        frac = self.done / self.total
        fill = int(frac * self.width)
        bar = "=" * fill + (">" if fill < self.width else "") + " " * (self.width - fill - 1)
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        count = f"{self.done:>{len(str(self.total))}}/{self.total}"
        sys.stderr.write(f"\rclassify {count} [{bar}] {frac:4.0%} {rate:.0f} img/s")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def open_model(args: argparse.Namespace) -> EdgeModel:
    """The export of --model, refused if uncertified unless --allow-uncertified (then a warning on stderr)."""
    manifest = load_manifest(args.model)
    if args.allow_uncertified and manifest.verdict != CERTIFIED:
        print(f"kdq-edge: warning: running an uncertified export (verdict: {manifest.verdict})", file=sys.stderr)
    return EdgeModel(manifest, threads=args.threads, fmt=args.format, allow_uncertified=args.allow_uncertified)


def print_text(result: Result) -> None:
    note = "" if result.mode == "RGB" else f"  (converted from {result.mode})"
    print(f"{result.path}{note}")
    for rank, p in enumerate(result.top, 1):
        print(f"  {rank}. {p.label:<20} {p.probability:.4f}")


def cmd_classify(args: argparse.Namespace) -> int:
    paths = image_files(args.images)
    if not paths:
        print(f"kdq-edge: error: no image files in {' '.join(args.images)}", file=sys.stderr)
        return EXIT_IMAGES
    model = open_model(args)
    show = sys.stderr.isatty() if args.progress is None else args.progress
    progress = Progress(len(paths), show)
    results, errors = [], []
    for item in model.iter_classify(paths, k=args.top_k, batch_size=args.batch_size, alpha=args.alpha):
        progress.update()
        if isinstance(item, ImageError):
            errors.append(str(item))
            if not args.json:
                print(f"kdq-edge: error: {item}", file=sys.stderr)
            continue
        results.append(item)
        if not args.json:
            print_text(item)
    if args.json:
        m = model.manifest
        doc = {
            "model": {
                "folder": str(m.folder),
                "format": model.format,
                f"{model.format}_sha256": m.artifacts[model.format]["sha256"],
                "classes": m.classes,
            },
            "results": [r.to_json(args.logits) for r in results],
            "errors": errors,
        }
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return EXIT_IMAGES if errors else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    m = load_manifest(args.model)
    for fmt in m.artifacts:
        verified_bytes(m, fmt)
    raw = m.raw
    print(f"model folder   {m.folder}")
    print(f"input          {m.input_name} float32 [batch, 3, {m.height}, {m.width}] NCHW")
    fit = f"shorter side to {m.width}, center crop" if m.crop == "center" else f"stretch to {m.width}x{m.height}"
    print(f"preprocessing  RGB, {m.resize} resize: {fit}, (pixel / 255 - mean) / std")
    print(f"               mean {list(m.mean)}  std {list(m.std)}")
    print(f"classes        {len(m.classes)}: {', '.join(m.classes[:10])}{' ...' if len(m.classes) > 10 else ''}")
    for fmt, art in m.artifacts.items():
        print(f"{fmt:<14} {art['file']}  {art['bytes']} bytes  sha256 {art['sha256'][:16]}…  verified")
    quant = raw.get("quantization", {})
    if quant:
        print(f"quantization   {quant.get('backend', '?')} ({quant.get('flow', quant.get('method', '?'))})")
    print_certificate(m)
    return EXIT_OK


def print_certificate(m: Manifest) -> None:
    """The verdict, the CPU class it was measured on, and every gate's result from the certificate's report."""
    cert, refused = m.certificate, " (classify and bench refuse it without --allow-uncertified)"
    if not cert:
        print(f"certificate    none: exported with --no-verify{refused}")
        return
    where = cert.get("measured_on", {})
    isa = where.get("int8_isa", {})
    cpu_class = "VNNI" if where.get("vnni") else "AVX2 (no VNNI)"
    print(f"certificate    {m.verdict}{'' if m.verdict == CERTIFIED else refused}")
    others = ", ".join(p for p in cert.get("paths", {}) if p != "native") or "no other path"
    print(
        f"measured on    {where.get('cpu_model', '?')} ({where.get('machine', '?')}, {cpu_class}; int8 kernels: "
        f"PyTorch {isa.get('pytorch', '?')}, ONNX Runtime {isa.get('onnxruntime', '?')}); also checked: {others}"
    )
    report_path = m.certificate_report
    try:
        checks = json.loads(report_path.read_text(encoding="utf-8"))["checks"]
    except (OSError, ValueError, KeyError) as e:
        print(f"gates          {report_path}: not readable ({e.__class__.__name__}); thresholds: {raw_gates(m)}")
        return
    print(f"gates          {len(checks)} checks from {report_path.name}:")
    for c in checks:
        value, bound = c.get("value"), c.get("threshold")
        measured = "" if value is None else f"  {value:.4g}" if isinstance(value, float) else f"  {value}"
        limit = "" if bound is None or isinstance(bound, bool) else f" (bound {bound})"
        print(f"  {c['verdict']:<10} {c['name']}{measured}{limit}")


def raw_gates(m: Manifest) -> str:
    gates = m.raw.get("target", {}).get("gates", {})
    return ", ".join(f"{k}={v}" for k, v in gates.items()) or "none recorded"


def cmd_to_ppm(args: argparse.Namespace) -> int:
    im, mode = load_image(args.image, args.alpha)
    write_ppm(im, args.out)
    note = "" if mode == "RGB" else f" (converted from {mode})"
    print(f"{args.out}: {im.width}x{im.height} RGB{note}", file=sys.stderr)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Per-image latency at batch 1: session.run only, and end to end (decode + preprocess + run)."""
    model = open_model(args)
    m = model.manifest
    x = np.random.default_rng(0).standard_normal((args.batch, 3, m.height, m.width), dtype=np.float32)

    def timed(fn, runs: int) -> float:
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    doc: dict = {"threads": args.threads, "batch": args.batch, "runs": args.runs}
    doc["model_ms"] = timed(lambda: model.logits(x), args.runs)
    if args.image:
        doc["end_to_end_ms"] = timed(lambda: model.classify_paths([args.image], k=1), args.runs)
    text = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in doc.items())
    print(json.dumps(doc) if args.json else text)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdq-edge", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"kdq-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="export folder (manifest.json + model.onnx) from `kdq export`")
        p.add_argument("--format", choices=FORMATS, default="auto",
                       help="model.onnx (ONNX Runtime) or model.pte (ExecuTorch, the extra kdq-edge[executorch]); "
                       "auto: onnx when the export has it")  # fmt: skip

    def uncertified_arg(p: argparse.ArgumentParser) -> None:
        help_ = "run an export whose certificate did not pass (rejected, not proven, --no-verify)"
        p.add_argument("--allow-uncertified", action="store_true", help=help_)

    def alpha_arg(p: argparse.ArgumentParser) -> None:
        help_ = "images with transparent pixels: refuse them (default) or drop alpha as training did"
        p.add_argument("--alpha", choices=ALPHA_POLICIES, default="refuse", help=help_)

    p = sub.add_parser("classify", help="top-k labels with probabilities for images or folders of images")
    model_arg(p)
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", "-k", type=int, default=5, help="labels per image (default: 5)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of text")
    p.add_argument("--logits", action="store_true", help="with --json: include the raw logits")
    p.add_argument("--batch-size", type=int, default=32, help="images per ONNX Runtime call (default: 32)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    uncertified_arg(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip
    alpha_arg(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("info", help="check the artifacts' sha256 and describe the model")
    model_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("to-ppm", help="write an image as binary PPM (RGB) for the C++ apps")
    p.add_argument("image")
    p.add_argument("out")
    alpha_arg(p)
    p.set_defaults(func=cmd_to_ppm)

    p = sub.add_parser("bench", help="per-image latency (median ms) of the ONNX model")
    model_arg(p)
    p.add_argument("--image", help="also time decode + preprocessing + run on this image")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", action="store_true")
    uncertified_arg(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("top_k", "batch_size", "threads", "runs", "batch"):
        if getattr(args, name, 1) < 1:
            print(f"kdq-edge: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_USAGE
    try:
        return args.func(args)
    except ImageError as e:
        print(f"kdq-edge: error: {e}", file=sys.stderr)
        return EXIT_IMAGES
    except EdgeError as e:
        print(f"kdq-edge: error: {e}", file=sys.stderr)
        return EXIT_MODEL


if __name__ == "__main__":
    sys.exit(main())
