"""Edge deployment (deploy/edge): the torch-free Python runtime and the C++ apps, installed, built and run
for real on the smoke export, and checked against kdq's PyTorch int8 predictions on the same image files.

- The Python runtime runs in its own venv (uv venv + uv pip install deploy/edge/python) without torch.
- The C++ apps are built by deploy/edge/cpp/build.sh into build/edge-cpp (gitignored, reused between runs).
- Reference: kdq's int8 model on the training preprocessing of each file (PIL convert("RGB") → shorter side to
  32, bilinear → center 32x32 → kdq.data.Normalize), batch 1, like the apps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EDGE_PY = ROOT / "deploy" / "edge" / "python"
BUILD_SH = ROOT / "deploy" / "edge" / "cpp" / "build.sh"
CPP_BUILD = ROOT / "build" / "edge-cpp"
EXIT_OK, EXIT_IMAGES, EXIT_USAGE, EXIT_MODEL = 0, 1, 2, 3


def run(cmd: list, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)


def uv() -> list[str]:
    exe = shutil.which("uv")
    return [exe] if exe else ["python3", "-m", "uv"]  # as the Makefile: uv, or the pip-installed module


def write_pnm(path: Path, pixels: np.ndarray) -> Path:
    """P5 for (H, W) uint8, P6 for (H, W, 3) uint8."""
    h, w = pixels.shape[:2]
    magic = "P5" if pixels.ndim == 2 else "P6"
    path.write_bytes(f"{magic}\n# kdq test image\n{w} {h}\n255\n".encode() + pixels.astype(np.uint8).tobytes())
    return path


def training_pixels(path: Path, size: int = 32) -> torch.Tensor:
    """uint8 (3, size, size): exactly kdq.data._read_images's decoding of an image file."""
    from kdq.data import fit_image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(fit_image(im.convert("RGB"), size)).copy()).permute(2, 0, 1)


def batch_one(model, x: torch.Tensor) -> torch.Tensor:
    """PyTorch int8 logits image by image on 1 thread, as the apps run by default: on 2 threads PyTorch's x86 int8
    kernels split a batch-1 image otherwise and round a rare output differently (measured: up to 0.13 logit
    downstream on the smoke student)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    finally:
        torch.set_num_threads(threads)


def logits_of(doc: dict) -> np.ndarray:
    return np.array([r["logits"] for r in doc["results"]], dtype=np.float32)


def check_against_pytorch(logits: np.ndarray, reference: dict, gates: dict) -> None:
    """ONNX Runtime int8 vs PyTorch int8, per the export's parity gates: the same top-1 wherever PyTorch's top-2
    margin exceeds the confident margin (near-ties may flip, as in the certificate) and logits within the mean
    tolerance."""
    ref = reference["torch"]
    top2 = np.sort(ref, axis=1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) > gates["ort_confident_margin"] * ref.std()  # in logit stds
    assert confident.sum() >= len(ref) // 2, "too few confident samples for a meaningful check"
    same = logits.argmax(1) == ref.argmax(1)
    assert same[confident].all(), f"top-1 differs on confident samples {np.flatnonzero(confident & ~same)}"
    assert np.abs(logits - ref).mean() / ref.std() <= gates["ort_mean_abs_logit_rel_max"]


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def export_dir(smoke_run: Path) -> Path:
    """The smoke pipeline's export: certified, or the edge apps would refuse to run it."""
    out = smoke_run / "export-x86"
    assert json.loads((out / "parity.json").read_text())["verdict"] == "certified", smoke_run / "export-x86.rejected"
    return out


@pytest.fixture(scope="module")
def gates(export_dir: Path) -> dict:
    return json.loads((export_dir / "manifest.json").read_text())["target"]["gates"]


@pytest.fixture(scope="module")
def images(tmp_path_factory, digits) -> dict:
    """Real digits in the shapes an app meets: grayscale, RGB up/downscaled to odd sizes, tinted, palette,
    opaque RGBA, noise. Each as PNG (Python runtime, reference) and PPM/PGM (C++ apps), same pixels."""
    folder = tmp_path_factory.mktemp("edge-images")
    png, pnm = folder / "png", folder / "pnm"
    png.mkdir()
    pnm.mkdir()
    rng = np.random.default_rng(0)
    sources = []
    for i, chw in enumerate(digits.test.images[:16].numpy()):
        rgb = chw.transpose(1, 2, 0)
        kind = i % 4
        if kind == 0:
            sources.append(Image.fromarray(rgb[:, :, 0], "L"))
        elif kind == 1:
            sources.append(Image.fromarray(rgb).resize((64, 64), Image.Resampling.BICUBIC))
        elif kind == 2:
            sources.append(Image.fromarray(rgb).resize((45, 37), Image.Resampling.NEAREST))
        else:
            tint = (rgb * np.array([1.0, 0.8, 0.6])).astype(np.uint8)
            sources.append(Image.fromarray(tint).resize((20, 27), Image.Resampling.LANCZOS))
    sources.append(Image.fromarray(digits.test.images[16, 0].numpy(), "L").convert("P"))
    sources.append(Image.fromarray(digits.test.images[17].numpy().transpose(1, 2, 0)).convert("RGBA"))
    sources.append(Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)))
    pngs, pnms = [], []
    for i, im in enumerate(sources):
        pngs.append(png / f"{i:02d}.png")
        im.save(pngs[-1])
        pixels = np.asarray(im) if im.mode == "L" else np.asarray(im.convert("RGB"))
        pnms.append(write_pnm(pnm / f"{i:02d}.{'pgm' if im.mode == 'L' else 'ppm'}", pixels))
    # Transparent pixels: refused unless --alpha drop.
    rgba = np.dstack([digits.test.images[18].numpy().transpose(1, 2, 0), np.full((32, 32), 255, np.uint8)])
    rgba[:8, :8, 3] = 0
    transparent = folder / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(transparent)
    return {"png": pngs, "pnm": pnms, "folder": png, "transparent": transparent, "modes": [s.mode for s in sources]}


@pytest.fixture(scope="module")
def reference(smoke_run: Path, export_dir: Path, images: dict) -> dict:
    """kdq's logits, batch 1, on the training preprocessing of each PNG (and of the transparent one, alpha
    dropped): "torch" from kdq's PyTorch int8 model, "ort" from kdq's own ONNX Runtime session (kdq.parity)."""
    from kdq.checkpoint import load_checkpoint
    from kdq.data import Normalize
    from kdq.parity import ort_session
    from kdq.quant import int8_model

    ckpt = load_checkpoint(smoke_run / "student_qat" / "checkpoint.pt")
    model = int8_model(ckpt, engine=ckpt["quantization"]["backend"])  # the apps' engine (KDQ_CPU steers kdq only)
    norm = Normalize(**ckpt["normalization"])
    x = norm(torch.stack([training_pixels(p) for p in [*images["png"], images["transparent"]]])).contiguous()
    logits = batch_one(model, x).numpy()
    session = ort_session(export_dir / "model.onnx", 1)
    ort = np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    return {
        "torch": logits[:-1],
        "ort": ort[:-1],
        "ort_transparent": ort[-1],
    }


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    """A venv with only deploy/edge/python and its dependencies (same onnxruntime/numpy/pillow versions as
    kdq's environment, so the same ONNX Runtime library runs in both)."""
    venv = tmp_path_factory.mktemp("edge-venv") / "venv"
    r = run([*uv(), "venv", "-q", "--python", sys.executable, venv])
    assert r.returncode == 0, r.stderr
    pins = [f"{p}=={version(p)}" for p in ("onnxruntime", "numpy", "pillow")]
    r = run([*uv(), "pip", "install", "-q", "--python", venv / "bin" / "python", EDGE_PY, *pins])
    assert r.returncode == 0, r.stderr
    return venv


@pytest.fixture(scope="module")
def kdq_edge(edge_venv: Path) -> Path:
    return edge_venv / "bin" / "kdq-edge"


@pytest.fixture(scope="module")
def cpp_apps() -> Path:
    """deploy/edge/cpp/build.sh into build/edge-cpp (incremental); installs cmake/g++ with apt if missing."""
    missing = [pkg for tool, pkg in (("cmake", "cmake"), ("c++", "g++")) if shutil.which(tool) is None]
    if missing:
        assert shutil.which("apt-get") and os.geteuid() == 0, f"install {' '.join(missing)} to build the C++ apps"
        assert run(["apt-get", "update", "-qq"]).returncode == 0
        r = run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], timeout=600)
        assert r.returncode == 0, r.stderr
    r = run(["bash", BUILD_SH, CPP_BUILD], timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return CPP_BUILD


@pytest.fixture
def tampered(export_dir: Path, tmp_path: Path):
    """A copy of the export with one byte of the named artifact flipped."""

    def make(name: str) -> Path:
        copy = tmp_path / f"tampered-{name}"
        shutil.copytree(export_dir, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        return copy

    return make


@pytest.fixture
def no_manifest(export_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "no-manifest"
    shutil.copytree(export_dir, copy)
    (copy / "manifest.json").unlink()
    return copy


# ------------------------------------------------------------------------------------ Python runtime


def test_runtime_installs_and_runs_without_torch(edge_venv: Path, export_dir: Path, images: dict):
    py = edge_venv / "bin" / "python"
    r = run([py, "-c", "import torch"])
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    probe = (
        "import sys, json, importlib.metadata as md, kdq_edge, kdq_edge.cli;"
        f"m = kdq_edge.load_model({str(export_dir)!r}); m.classify_paths([{str(images['png'][0])!r}]);"
        "print(json.dumps({'mods': sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'kdq')),"
        " 'requires': md.requires('kdq-edge')}))"
    )
    r = run([py, "-c", probe])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mods"] == []  # neither torch nor kdq was imported
    base = [req for req in doc["requires"] if "extra ==" not in req]  # the optional extra: model.pte (executorch)
    assert sorted({re.split(r"[<>=;\s]", req)[0] for req in base}) == ["numpy", "onnxruntime", "pillow"]
    assert [re.split(r"[<>=\s]", req)[0] for req in doc["requires"] if "extra ==" in req] == ["executorch"]


def test_python_runtime_matches_kdq(kdq_edge: Path, export_dir: Path, images: dict, reference: dict, gates: dict):
    r = run([kdq_edge, "classify", "--model", export_dir, "--json", "--logits", "--batch-size", "1",
             "--top-k", "3", *images["png"]])  # fmt: skip
    assert r.returncode == EXIT_OK, r.stderr
    doc = json.loads(r.stdout)
    assert [res["path"] for res in doc["results"]] == [str(p) for p in images["png"]]
    assert [res["mode"] for res in doc["results"]] == images["modes"]  # grayscale/palette/RGBA converted
    logits = logits_of(doc)
    # Same numbers as kdq's own ONNX Runtime check (kdq.parity) fed with kdq's preprocessing: the runtime's
    # torch-free preprocessing is bit-identical to training's.
    np.testing.assert_array_equal(logits, reference["ort"])
    check_against_pytorch(logits, reference, gates)

    for res, row in zip(doc["results"], logits, strict=True):
        probs = [t["probability"] for t in res["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
        assert (
            res["top"][0]["index"] == int(row.argmax())
            and res["top"][0]["label"] == doc["model"]["classes"][int(row.argmax())]
        )


def test_python_runtime_folder_batch_with_progress(kdq_edge: Path, export_dir: Path, images: dict, reference):
    r = run(
        [kdq_edge, "classify", "--model", export_dir, images["folder"], "--batch-size", "4", "--progress", "-k", "1"]
    )
    assert r.returncode == EXIT_OK, r.stderr
    assert re.search(rf"classify {len(images['png'])}/{len(images['png'])} \[=+\] 100%", r.stderr), r.stderr
    lines = r.stdout.splitlines()
    heads = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert heads == [str(p) for p in images["png"]]  # the folder, sorted, every image once
    assert "(converted from L)" in lines[0]
    labels = [line.split()[1] for line in lines if line.startswith("  1. ")]
    classes = json.loads((export_dir / "manifest.json").read_text())["classes"]
    ref_top1 = [classes[i] for i in reference["ort"].argmax(1)]
    assert labels == ref_top1  # batches of 4 give the batch-1 predictions


def test_python_runtime_refuses_tampered_model(kdq_edge: Path, tampered, images: dict):
    r = run([kdq_edge, "classify", "--model", tampered("model.onnx"), images["png"][0]])
    assert r.returncode == EXIT_MODEL
    assert "model.onnx: sha256" in r.stderr and "does not match the manifest" in r.stderr and not r.stdout


def uncertified(export_dir: Path, folder: Path, verdict: str | None) -> Path:
    """A copy of the certified export whose certificate says `verdict` (None: no certificate, as --no-verify
    writes), its report failing one gate to match."""
    shutil.copytree(export_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if verdict is None:
        del manifest["certificate"]
    else:
        manifest["certificate"].update(verdict=verdict, passed=False)
        report = json.loads((folder / "parity.json").read_text())
        report["checks"][0]["verdict"] = "fail"
        (folder / "parity.json").write_text(json.dumps(report))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_only_a_certified_export_runs_and_info_shows_its_certificate(
    kdq_edge: Path, cpp_apps: Path, export_dir: Path, images: dict, tmp_path: Path
):
    """Both runtimes refuse a rejected export, or one exported without a certificate, in one line unless
    --allow-uncertified; `kdq-edge info` shows the verdict, the CPU it was measured on and every gate."""
    report = json.loads((export_dir / "parity.json").read_text())
    r = run([kdq_edge, "info", "--model", export_dir])
    assert r.returncode == EXIT_OK, r.stderr
    assert re.search(r"^certificate +certified$", r.stdout, re.M), r.stdout
    cpu = report["where"]["cpu_model"]
    assert re.search(rf"^measured on +{re.escape(cpu)} \(x86_64, (VNNI|AVX2 \(no VNNI\)); int8 kernels", r.stdout, re.M)
    for check in report["checks"]:
        assert re.search(rf"^  {check['verdict']} +{re.escape(check['name'])}(?=\s|$)", r.stdout, re.M), check["name"]

    rejected, unverified = uncertified(export_dir, tmp_path / "rejected", "rejected"), uncertified(
        export_dir, tmp_path / "unverified", None)  # fmt: skip
    r = run([kdq_edge, "info", "--model", rejected])
    assert r.returncode == EXIT_OK and re.search(r"^certificate +rejected \(classify and bench refuse", r.stdout, re.M)
    assert re.search(rf"^  fail +{re.escape(report['checks'][0]['name'])}(?=\s|$)", r.stdout, re.M), r.stdout
    for folder, why in [(rejected, f"its certificate is rejected (see {rejected}/parity.json)"),
                        (unverified, "it was exported without a certificate (--no-verify)")]:  # fmt: skip
        for cmd in ([kdq_edge, "classify", "--model", folder, images["png"][0]],
                    [kdq_edge, "bench", "--model", folder, "--runs", "1", "--warmup", "1"],
                    [cpp_apps / "kdq-classify-ort", "--model", folder, images["pnm"][0]],
                    [cpp_apps / "kdq-classify-torch", "--model", folder, images["pnm"][0]]):  # fmt: skip
            r = run(cmd)
            assert r.returncode == EXIT_MODEL and not r.stdout, (cmd, r.stderr)
            assert r.stderr.count("\n") == 1 and f"refusing to run an uncertified export: {why}" in r.stderr, r.stderr
            r = run([*cmd, "--allow-uncertified"])
            assert r.returncode == EXIT_OK and "warning: running an uncertified export" in r.stderr, (cmd, r.stderr)
            assert "bench" in cmd or "1. " in r.stdout, r.stdout


def test_python_runtime_needs_the_manifest(kdq_edge: Path, no_manifest: Path, tmp_path: Path, images: dict):
    r = run([kdq_edge, "classify", "--model", no_manifest, images["png"][0]])
    assert r.returncode == EXIT_MODEL and "no manifest.json" in r.stderr
    r = run([kdq_edge, "classify", "--model", tmp_path / "nowhere", images["png"][0]])
    assert r.returncode == EXIT_MODEL and "no such model folder" in r.stderr


def test_python_runtime_bad_images(kdq_edge: Path, export_dir: Path, images: dict, reference: dict, tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(images["png"][5].read_bytes()[:60])
    good = images["png"][1]
    r = run([kdq_edge, "classify", "--model", export_dir, broken, good, truncated, tmp_path / "missing.png"])
    assert r.returncode == EXIT_IMAGES
    assert f"{broken}: cannot decode image" in r.stderr and f"{truncated}: cannot decode image" in r.stderr
    assert f"{tmp_path / 'missing.png'}: no such file" in r.stderr
    assert r.stdout.splitlines()[0] == str(good)  # the good image is still classified

    r = run([kdq_edge, "classify", "--model", export_dir, "--json", images["transparent"]])
    assert r.returncode == EXIT_IMAGES
    doc = json.loads(r.stdout)
    assert doc["results"] == [] and "transparent pixels" in doc["errors"][0] and "--alpha drop" in doc["errors"][0]

    r = run(
        [kdq_edge, "classify", "--model", export_dir, "--json", "--logits", "--alpha", "drop", images["transparent"]]
    )
    assert r.returncode == EXIT_OK, r.stderr
    res = json.loads(r.stdout)["results"][0]
    assert res["mode"] == "RGBA"
    np.testing.assert_array_equal(np.float32(res["logits"]), reference["ort_transparent"])


def test_to_ppm_writes_what_the_cpp_apps_read(kdq_edge: Path, images: dict, tmp_path: Path):
    for i in (1, 17):  # RGB 64x64, opaque RGBA
        out = tmp_path / f"{i}.ppm"
        r = run([kdq_edge, "to-ppm", images["png"][i], out])
        assert r.returncode == EXIT_OK, r.stderr
        header, raster = out.read_bytes().split(b"\n", 3)[:3], out.read_bytes().split(b"\n", 3)[3]
        assert header[0] == b"P6" and header[2] == b"255"
        assert raster == images["pnm"][i].read_bytes().split(b"\n", 4)[4]  # same pixels as the test's writer


# ---------------------------------------------------------------------------------------------- C++ apps


def cpp(app: str, build: Path, *args) -> subprocess.CompletedProcess:
    return run([build / app, *args])


def test_cpp_torch_app_equals_kdq_int8(cpp_apps: Path, export_dir: Path, images: dict, reference: dict):
    r = cpp("kdq-classify-torch", cpp_apps, "--model", export_dir, "--json", "--logits", *images["pnm"])
    assert r.returncode == EXIT_OK, r.stderr
    assert "warning" not in r.stderr.lower()
    doc = json.loads(r.stdout)
    assert [res["mode"] for res in doc["results"]] == ["L" if m == "L" else "RGB" for m in images["modes"]]
    logits = logits_of(doc)
    # TorchScript int8 == PyTorch int8 bit for bit (the export's torchscript_identical gate), through a
    # from-scratch C++ PPM reader, Pillow-exact resize and normalization.
    np.testing.assert_array_equal(logits, reference["torch"])
    assert [res["top"][0]["index"] for res in doc["results"]] == reference["torch"].argmax(1).tolist()


def test_cpp_ort_app_matches_kdq(cpp_apps: Path, export_dir: Path, images: dict, reference: dict, gates: dict):
    r = cpp("kdq-classify-ort", cpp_apps, "--model", export_dir, "--json", "--logits", *images["pnm"])
    assert r.returncode == EXIT_OK, r.stderr
    logits = logits_of(json.loads(r.stdout))
    # Same ONNX Runtime library as kdq's: identical numbers, so the C++ PPM reader, resize and normalization
    # are bit-identical to Pillow + kdq.data.Normalize.
    np.testing.assert_array_equal(logits, reference["ort"])
    check_against_pytorch(logits, reference, gates)


def test_cpp_resize_is_pillow_exact(cpp_apps: Path, export_dir: Path, tmp_path: Path):
    """--dump-input writes the preprocessed tensor: compare it with kdq's own read of an image (torchvision's
    Resize + CenterCrop on Pillow, `kdq.data.fit_image`) + the manifest's normalization."""
    from kdq.data import fit_image

    m = json.loads((export_dir / "manifest.json").read_text())["preprocessing"]
    assert m["crop"] == "center"
    mean = np.float32(m["mean"]).reshape(3, 1, 1)
    std = np.float32(m["std"]).reshape(3, 1, 1)
    rng = np.random.default_rng(1)
    for h, w in ((150, 200), (33, 31), (7, 90), (32, 32), (5, 3), (1000, 17)):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ppm, dump = write_pnm(tmp_path / f"{h}x{w}.ppm", pixels), tmp_path / f"{h}x{w}.f32"
        r = cpp("kdq-classify-ort", cpp_apps, "--model", export_dir, "--dump-input", dump, ppm)
        assert r.returncode == EXIT_OK, r.stderr
        small = np.asarray(fit_image(Image.fromarray(pixels), 32))
        expected = (small.transpose(2, 0, 1).astype(np.float32) / np.float32(255) - mean) / std
        np.testing.assert_array_equal(np.fromfile(dump, dtype=np.float32).reshape(3, 32, 32), expected)


@pytest.mark.parametrize(("app", "artifact"), [("kdq-classify-torch", "model.pt"), ("kdq-classify-ort", "model.onnx")])
def test_cpp_apps_refuse_bad_models(cpp_apps: Path, tampered, no_manifest: Path, images, app: str, artifact: str):
    r = cpp(app, cpp_apps, "--model", tampered(artifact), images["pnm"][0])
    assert r.returncode == EXIT_MODEL
    assert f"{artifact}: sha256" in r.stderr and "does not match the manifest" in r.stderr and not r.stdout
    r = cpp(app, cpp_apps, "--model", no_manifest, images["pnm"][0])
    assert r.returncode == EXIT_MODEL and "no manifest.json" in r.stderr
    r = cpp(app, cpp_apps, images["pnm"][0])
    assert r.returncode == EXIT_USAGE and "--model DIR is required" in r.stderr


def test_cpp_apps_bad_images(cpp_apps: Path, export_dir: Path, images: dict, tmp_path: Path):
    truncated = tmp_path / "truncated.ppm"
    truncated.write_bytes(images["pnm"][1].read_bytes()[:500])
    deep = tmp_path / "deep.pgm"
    deep.write_bytes(b"P5\n4 4\n65535\n" + bytes(32))
    garbage = tmp_path / "garbage.ppm"
    garbage.write_bytes(b"GIF89a...")
    good = images["pnm"][2]
    for app in ("kdq-classify-torch", "kdq-classify-ort"):
        r = cpp(app, cpp_apps, "--model", export_dir, images["png"][0], truncated, good, deep, garbage)
        assert r.returncode == EXIT_IMAGES, r.stderr
        assert f"{images['png'][0]}: cannot decode image (PNG; this app reads PPM/PGM only" in r.stderr
        assert f"{truncated}: cannot decode image (truncated" in r.stderr
        assert f"{deep}: cannot decode image (maxval 65535" in r.stderr
        assert f"{garbage}: cannot decode image (not a PPM" in r.stderr
        assert r.stdout.splitlines()[0] == str(good)  # the good image is still classified


def test_latency_benchmarks_run(cpp_apps: Path, kdq_edge: Path, export_dir: Path, images: dict):
    """The commands behind the README's latency table (batch 1, 1 thread) report positive per-image times."""
    for app in ("kdq-classify-torch", "kdq-classify-ort"):
        r = cpp(app, cpp_apps, "--model", export_dir, "--bench", "20", "--threads", "1", images["pnm"][1])
        assert r.returncode == EXIT_OK, r.stderr
        bench = re.search(r"model_ms ([\d.]+)\s+end_to_end_ms ([\d.]+)", r.stderr)
        assert bench and 0 < float(bench[1]) <= float(bench[2]) * 1.5, r.stderr
    r = run([kdq_edge, "bench", "--model", export_dir, "--runs", "20", "--image", images["png"][1], "--json"])
    assert r.returncode == EXIT_OK, r.stderr
    doc = json.loads(r.stdout)
    assert doc["threads"] == 1 and doc["batch"] == 1 and 0 < doc["model_ms"] and 0 < doc["end_to_end_ms"]


def test_python_runtime_sets_the_session_config_the_export_was_certified_with(export_dir: Path, tmp_path: Path):
    """The arm target certifies ONNX Runtime's exact int8 kernels (export/arm.toml): kdq-edge sets the same."""
    sys.path.insert(0, str(EDGE_PY))
    try:
        from kdq_edge.manifest import load_manifest
        from kdq_edge.model import EdgeModel
    finally:
        sys.path.remove(str(EDGE_PY))
    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["target"]["onnxruntime_config"] = {"session.x64quantprecision": "1"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    options = EdgeModel(load_manifest(folder)).session.get_session_options()
    assert options.get_session_config_entry("session.x64quantprecision") == "1"


def test_cpp_ort_app_sets_the_session_config_the_export_was_certified_with(
    cpp_apps: Path, export_dir, images, tmp_path
):
    """An entry with a visible effect (load the bytes as ORT format, which they are not) proves the C++ app sets
    the manifest's `target.onnxruntime_config` on its session, as kdq-edge does (the arm target's exact kernels)."""
    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["target"]["onnxruntime_config"] = {"session.load_model_format": "ORT"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    r = cpp("kdq-classify-ort", cpp_apps, "--model", folder, images["pnm"][0])
    assert r.returncode == EXIT_MODEL and "ORT model verification failed" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ another input size


def test_edge_crop_is_torchvisions_resize_and_center_crop(tmp_path):
    """kdq_edge's Pillow-only fit equals kdq.data.fit_image (torchvision Resize + CenterCrop) pixel for pixel."""
    sys.path.insert(0, str(EDGE_PY))
    try:
        from kdq_edge.image import resize
        from kdq_edge.manifest import Manifest
    finally:
        sys.path.remove(str(EDGE_PY))
    from kdq.data import fit_image

    rng = np.random.default_rng(1)
    for w, h, size in [(50, 80, 32), (80, 50, 32), (96, 96, 96), (200, 120, 96), (33, 97, 48), (97, 33, 32)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        m = Manifest(tmp_path, "input", "logits", size, size, (0, 0, 0), (1, 1, 1), 1 / 255, "bilinear", "center",
                     "RGB", [], {}, {})  # fmt: skip
        assert np.array_equal(resize(im, m), np.asarray(fit_image(im, size)).transpose(2, 0, 1)), (w, h, size)


def test_format_1_manifests_stretch_and_a_center_crop_needs_a_square(cpp_apps: Path, export_dir: Path, tmp_path):
    """Exports from before the crop (manifest format 1) were trained on stretched images: both runtimes stretch
    them. Format 2 writes `crop`; a center crop of a non-square size is refused by both."""
    sys.path.insert(0, str(EDGE_PY))
    try:
        from kdq_edge.image import resize
        from kdq_edge.manifest import ManifestError, load_manifest
    finally:
        sys.path.remove(str(EDGE_PY))

    def variant(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(export_dir, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["format_version"] == 2 and manifest["preprocessing"]["crop"] == "center"
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    old = variant("format-1", lambda m: (m.update(format_version=1), m["preprocessing"].pop("crop")))
    pre = json.loads((old / "manifest.json").read_text())["preprocessing"]
    pixels = np.random.default_rng(2).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    stretched = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(resize(Image.fromarray(pixels), load_manifest(old)), stretched)
    ppm, dump = write_pnm(tmp_path / "wide.ppm", pixels), tmp_path / "wide.f32"
    r = cpp("kdq-classify-ort", cpp_apps, "--model", old, "--dump-input", dump, ppm)
    assert r.returncode == EXIT_OK, r.stderr
    mean, std = np.float32(pre["mean"]).reshape(3, 1, 1), np.float32(pre["std"]).reshape(3, 1, 1)
    expected = (stretched.astype(np.float32) / np.float32(255) - mean) / std
    np.testing.assert_array_equal(np.fromfile(dump, dtype=np.float32).reshape(3, 32, 32), expected)

    wide = variant("wide", lambda m: m["preprocessing"].update(size=[32, 48]))
    with pytest.raises(ManifestError, match="crop 'center' needs a square size"):
        load_manifest(wide)
    r = cpp("kdq-classify-ort", cpp_apps, "--model", wide, ppm)
    assert r.returncode == EXIT_MODEL and "crop center needs a square size, got 32x48" in r.stderr, r.stderr


def shapes_folder(root: Path, size: int, per_class: int) -> Path:
    """train/ and test/ class folders of `size` x `size` PNGs: a red disc, a green bar or a blue square at a
    random place on dark noise (colour makes it learnable in a few dozen steps)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for label in ("disc", "bar", "square"):
            (root / split / label).mkdir(parents=True)
            colour = {"disc": 0, "bar": 1, "square": 2}[label]
            for i in range(n):
                cy, cx, r = *rng.integers(size // 4, 3 * size // 4, 2), size // 6
                mask = {"disc": (yy - cy) ** 2 + (xx - cx) ** 2 < r * r,
                        "bar": (abs(yy - cy) < r // 3) & (abs(xx - cx) < 2 * r),
                        "square": (abs(yy - cy) < r) & (abs(xx - cx) < r)}[label]  # fmt: skip
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[mask] = 40
                pixels[..., colour][mask] = rng.integers(180, 256)
                Image.fromarray(pixels).save(root / split / label / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def export_96(tmp_path_factory) -> dict:
    """96x96 PNGs trained (ImageNet stem above 64 px), quantized, exported and certified at 96x96; with the
    certificate's ONNX Runtime predictions on the test files, batch 1."""
    from click.testing import CliRunner

    from kdq.checkpoint import load_checkpoint
    from kdq.cli import main
    from kdq.data import Normalize, load_dataset
    from kdq.parity import ort_session
    from kdq.quant import int8_model

    tmp_path = tmp_path_factory.mktemp("size-96")
    data_dir = shapes_folder(tmp_path / "shapes", 96, 40)
    run_dir = tmp_path / "run"
    common = ["--preset", "smoke", "--dataset", "folder", "--data-dir", data_dir, "--image-size", "96",
              "--device", "cpu", "--run-dir", run_dir, "--no-tensorboard"]  # fmt: skip
    cli = CliRunner()
    argv = ["baseline", *common, "--epochs", "8", "--batch-size", "16", "--val-fraction", "0"]
    result = cli.invoke(main, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    baseline = run_dir / "baseline" / "checkpoint.pt"
    int8 = tmp_path / "int8" / "checkpoint.pt"
    result = cli.invoke(main, [str(a) for a in ["quantize", baseline, "--out", int8, "--data-dir", data_dir]])
    assert result.exit_code == 0, result.output
    out = tmp_path / "export"
    from tests.targets import smoke_target

    # tests/smoke-target.toml's gates, where 2 of 60 test images may flip in ORT
    target = smoke_target("x86", tmp_path, ort_accuracy_delta_max=0.05, int8_accuracy_drop_max=0.05)
    argv = ["export", int8, "--target", target, "--out", out, "--data-dir", data_dir, "--latency-runs", "3"]
    result = cli.invoke(main, [str(a) for a in argv])
    assert result.exit_code == 0, result.output

    test = load_dataset("folder", data_dir, image_size=96).test  # the certificate's test split, as it read it
    ckpt = load_checkpoint(int8)
    x = Normalize(**ckpt["normalization"])(test.images)
    session = ort_session(out / "model.onnx", 1)
    certified = np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    model = int8_model(ckpt, engine=ckpt["quantization"]["backend"])  # the apps' engine (KDQ_CPU steers kdq only)
    pytorch_int8 = batch_one(model, x)
    files = sorted((data_dir / "test").glob("*/*.png"))  # ImageFolder's order: classes, then file names
    return {"out": out, "files": files, "certified": certified.argmax(1).tolist(), "pytorch_int8": pytorch_int8}


def test_a_96px_folder_trains_exports_certifies_and_runs_at_the_edge(export_96: dict, kdq_edge: Path):
    """Done-when of "any input size": kdq-edge gives the certificate's ONNX Runtime predictions at 96x96."""
    out = export_96["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["shape"] == ["batch", 3, 96, 96] and manifest["preprocessing"]["size"] == [96, 96]
    assert manifest["preprocessing"]["crop"] == "center"
    parity = json.loads((out / "parity.json").read_text())
    # 60 test images prove no 5 pt bound (kdq.stats): the export lands "not proven", and never "rejected"
    assert parity["verdict"] == manifest["certificate"]["verdict"] == "not proven"
    assert parity["accuracy"]["onnxruntime_int8"] > 0.6  # chance: 1/3
    argv = [kdq_edge, "classify", "--model", out, "--json", "--batch-size", "1", "--top-k", "1", *export_96["files"]]
    r = run(argv)  # "not proven" is not certified: refused, in one line
    assert r.returncode == EXIT_MODEL and r.stderr.count("\n") == 1, r.stderr
    assert "refusing to run an uncertified export: its certificate is not proven" in r.stderr, r.stderr
    assert "--allow-uncertified" in r.stderr
    r = run([*argv, "--allow-uncertified"])
    assert r.returncode == EXIT_OK, r.stderr
    assert [res["top"][0]["index"] for res in json.loads(r.stdout)["results"]] == export_96["certified"]


def test_cpp_apps_run_a_96px_model(export_96: dict, cpp_apps: Path, tmp_path: Path):
    """The C++ apps read the size from the manifest too. On the same pixels as PPM: the ORT app gives the
    certificate's predictions, the TorchScript app PyTorch int8's logits bit for bit (crop included)."""
    ppms = [
        write_pnm(tmp_path / f"{png.parent.name}-{png.stem}.ppm", np.asarray(Image.open(png).convert("RGB")))
        for png in export_96["files"]
    ]
    for app in ("kdq-classify-ort", "kdq-classify-torch"):  # "not proven": refused in one line unless allowed
        r = cpp(app, cpp_apps, "--model", export_96["out"], *ppms)
        assert r.returncode == EXIT_MODEL and r.stderr.count("\n") == 1, r.stderr
        assert "refusing to run an uncertified export: its certificate is not proven" in r.stderr, r.stderr
    r = cpp("kdq-classify-ort", cpp_apps, "--model", export_96["out"], "--allow-uncertified", "--json", "--top-k", "1",
            *ppms)  # fmt: skip
    assert r.returncode == EXIT_OK, r.stderr
    assert [res["top"][0]["index"] for res in json.loads(r.stdout)["results"]] == export_96["certified"]
    r = cpp("kdq-classify-torch", cpp_apps, "--model", export_96["out"], "--allow-uncertified", "--json", "--logits",
            *ppms)  # fmt: skip
    assert r.returncode == EXIT_OK, r.stderr
    np.testing.assert_array_equal(logits_of(json.loads(r.stdout)), export_96["pytorch_int8"].numpy())
