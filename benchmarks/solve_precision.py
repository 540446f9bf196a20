"""Accuracy of the TrAct solve in float32, float32 with iterative refinement, and float64 (issue 18, item 3).

The question: can a float32 Cholesky solve (fast on every GPU; float64 runs at 1/64 rate on consumer parts) be
made as accurate as the float64 one by one step of iterative refinement, and does the refinement's residual need
float64, or is a float32 residual enough? Accuracy only: the time of each variant on a GPU is measured by
`overhead.py` (variant `hf_tract_f32r`).

Cases:
    data      real Fashion-MNIST patches (first `--images` training images) for four first layers (ViT patch 7,
              3x3 stem, 7x7/2 stem on the image repeated into 3 channels: a rank-deficient Gram, ViT-B/16 on the
              image upsampled to 224 and repeated into 3 channels: n = 768), each with standardised, [0, 1] and
              [0, 255] pixels; the plain gradient is `U^T A` for a random upstream gradient U (64 outputs);
    synthetic Grams `G/N = Q diag(s) Q^T` with s log-spaced from 1e-6 to 1e4, 1e6, 1e8 (n = 147 and 768), i.e.
              condition numbers of `G/N + λI` up to 1e9, and random gradients.

Every variant gets the same float32 Gram and float32 gradient (what a training step has). Errors are relative
Frobenius distances to (a) the float64 solve of that same Gram ("solve error") and, for data cases, (b) the
float64 closed form from float64 patches ("end-to-end", which adds the float32 Gram's own rounding).

Variants: `float64`, `float32`, `float32_refined` (the library option: float32 factorisation, one refinement
step with a float64 residual), and the raw refinement with 1 or 2 steps and a float64 or float32 residual.

Usage (repository root):
    python benchmarks/solve_precision.py                     # writes benchmarks/results/solve_precision_cpu.{json,md}
    python benchmarks/solve_precision.py --quick --out-dir /tmp/sp   # fewer images, smaller cases (smoke)
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (puts the checkout's hf_tract first on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_tract import functional as tf  # noqa: E402
from hf_tract.functional import FLOAT32_REFINED  # noqa: E402
from hf_tract.geometry import PatchGeometry  # noqa: E402


LAMBDA = 0.1
OUTPUTS = 64
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
DATA_DIRS = [os.environ.get("FASHION_MNIST_DIR"), "/work/shared/data/fashion-mnist", "/usr/share/dataset-fashion-mnist"]
EMBEDDED = harness.REPO_ROOT / "examples" / "data" / "fashion_mnist_small" / "data" / "train-00000-of-00001.parquet"

# name -> (geometry, channels, upsample to)
LAYERS = {
    "vit_patch7": (PatchGeometry.conv((7, 7), 7), 1, None),
    "stem_3x3": (PatchGeometry.conv((3, 3), 1, 1), 1, None),
    "stem_7x7_2_rgb": (PatchGeometry.conv((7, 7), 2, 3), 3, None),
    "vit_b16_rgb_224": (PatchGeometry.conv((16, 16), 16), 3, 224),
}
SCALES = ("standardised", "[0,1]", "[0,255]")


def load_images(count: int) -> tuple[torch.Tensor, str]:
    """`count` Fashion-MNIST training images as `(count, 1, 28, 28)` float64 in [0, 1], and where they came from."""
    for folder in filter(None, DATA_DIRS):
        path = Path(folder) / "train-images-idx3-ubyte.gz"
        if path.is_file():
            with gzip.open(path, "rb") as f:
                pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16)[: count * 784]
            return torch.from_numpy(pixels.copy()).double().div(255).reshape(count, 1, 28, 28), str(path)
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(EMBEDDED, columns=["image"]).slice(0, count).to_pylist()
    images = np.stack([np.array(Image.open(io.BytesIO(row["image"]["bytes"]))) for row in rows])
    return torch.from_numpy(images).double().div(255).unsqueeze(1), str(EMBEDDED)


def scaled(images: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "standardised":
        return (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return images * (255.0 if scale == "[0,255]" else 1.0)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def raw_variants(regularized64: torch.Tensor, rhs32: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """The refinement study: solutions of `regularized64 x = rhs32` and the number of failed factorisations."""
    out = {}
    for steps in (1, 2):
        for residual in (torch.float64, torch.float32):
            name = f"raw_f32_{steps}step_{'f64' if residual == torch.float64 else 'f32'}_residual"
            solved, info = tf.refined_cholesky_solve(regularized64, rhs32, steps=steps, residual_dtype=residual)
            out[name] = (solved, int((info != 0).sum()))
    return out


def evaluate(gram32: torch.Tensor, rows: int, grad32: torch.Tensor, exact: torch.Tensor | None) -> dict:
    """Errors of every variant for one (float32 Gram, float32 gradient); `exact`: the float64 closed form."""
    groups, n, _ = gram32.shape
    regularized64 = gram32.double() / rows + LAMBDA * torch.eye(n, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(regularized64)
    reference = tf.precondition_with_gram(grad32.double(), gram32, rows, LAMBDA, torch.float64)
    result = {
        "n": n,
        "rows": rows,
        # Of the matrix as given (float32 Gram): not positive definite ("indefinite") when the float32
        # rounding of a huge Gram outweighs λ, as for eigenvalues up to 1e8.
        "condition_number": float(eigenvalues[..., -1].max() / eigenvalues[..., 0].min())
        if eigenvalues.min() > 0 else "indefinite",
        "condition_bound": float(1 + gram32.diagonal(dim1=1, dim2=2).sum(-1).max().double() / (rows * LAMBDA)),
        "solve_error": {},
        "end_to_end_error": {},
        "failed_factorisations": {},
    }
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32), ("float32_refined", FLOAT32_REFINED)):
        value = tf.precondition_with_gram(grad32, gram32, rows, LAMBDA, dtype)
        result["solve_error"][name] = relative(value, reference)
        if exact is not None:
            result["end_to_end_error"][name] = relative(value, exact)
    rhs32 = grad32.reshape(groups, grad32.shape[0] // groups, n).transpose(1, 2)
    for name, (solved, failures) in raw_variants(regularized64, rhs32).items():
        value = solved.transpose(1, 2).reshape(grad32.shape)
        result["solve_error"][name] = relative(value, reference)
        result["failed_factorisations"][name] = failures
        if exact is not None:
            result["end_to_end_error"][name] = relative(value, exact)
    factor, info = torch.linalg.cholesky_ex(regularized64.float())
    result["failed_factorisations"]["float32"] = int((info != 0).sum())
    return result


def data_cases(images: torch.Tensor, layers: list[str], log) -> list[dict]:
    cases = []
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        geometry, channels, size = LAYERS[layer]
        for scale in SCALES:
            x = scaled(images, scale)
            if size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            x = x.repeat(1, channels, 1, 1)
            patches64 = tf.patch_matrix(x, geometry)  # (1, N, n) float64
            rows, n = patches64.shape[1:]
            upstream = torch.randn(rows, OUTPUTS, generator=generator, dtype=torch.float64)
            grad64 = (upstream.T @ patches64[0]).reshape(OUTPUTS, channels, *geometry.kernel_size)
            exact = tf.precondition_with_gram(grad64, patches64.transpose(1, 2) @ patches64, rows, LAMBDA, torch.float64)
            gram32 = tf.patch_gram(x.float(), geometry)
            result = evaluate(gram32, rows, grad64.float(), exact)
            result.update(case=f"{layer} {scale}", kind="data")
            log(f"{result['case']}: n={n} N={rows} cond={result['condition_number']} solve errors "
                + ", ".join(f"{k} {v:.1e}" for k, v in result["solve_error"].items() if not k.startswith("raw")))
            cases.append(result)
    return cases


def synthetic_cases(sizes: list[int], log) -> list[dict]:
    cases = []
    generator = torch.Generator().manual_seed(1)
    for n in sizes:
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        for top in (4, 6, 8):
            spectrum = torch.logspace(-6, top, n, dtype=torch.float64)
            rows = 10_000
            gram32 = (rows * (q * spectrum) @ q.T).float().unsqueeze(0)
            grad32 = torch.randn(OUTPUTS, n, generator=generator).float()
            result = evaluate(gram32, rows, grad32, None)
            result.update(case=f"synthetic n={n} eig(G/N) 1e-6..1e{top}", kind="synthetic")
            log(f"{result['case']}: cond={result['condition_number']} solve errors "
                + ", ".join(f"{k} {v:.1e}" for k, v in result["solve_error"].items() if not k.startswith("raw")))
            cases.append(result)
    return cases


def render_markdown(data: dict) -> str:
    meta = data["meta"]
    variants = list(data["cases"][0]["solve_error"])
    lines = [
        f"# TrAct solve precision — {meta['device']}",
        "",
        f"torch {meta['torch']}, git {meta['git_commit'][:12]}, {meta['started']}; {meta['cpu_count']} CPUs, "
        f"{meta['torch_threads']} torch threads. Data: {meta['data']} ({meta['images']} images). λ = {LAMBDA}, "
        f"{OUTPUTS} outputs.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Solve error: relative Frobenius distance of the TrAct gradient to the float64 solve of the same float32 Gram "
        "and gradient. `cond`: condition number of G/N + λI (float64 eigenvalues); `bound`: 1 + trace(G)/(Nλ). "
        "`raw_*`: `refined_cholesky_solve` with the given steps and residual dtype; `float32_refined` is the "
        "library option (= raw 1 step, float64 residual, plus the library's fallback on a failed factorisation).",
        "",
        "| case | n | N | cond | bound | " + " | ".join(variants) + " |",
        "|---|---|---|---|---|" + "---|" * len(variants),
    ]
    def cell(case, variant, kind="solve_error"):
        # "fail": the raw float32 factorisation failed (no fallback); "*": the library fell back (CPU: eigh).
        failed = case["failed_factorisations"].get(variant, 0)
        if variant.startswith("raw") and failed:
            return "fail"
        fallback = variant in ("float32", "float32_refined") and case["failed_factorisations"]["float32"]
        return f"{case[kind][variant]:.1e}" + ("*" if fallback else "")

    for case in data["cases"]:
        cond = case["condition_number"]
        cond = f"{cond:.1e}" if isinstance(cond, float) else cond
        errors = " | ".join(cell(case, v) for v in variants)
        lines.append(f"| {case['case']} | {case['n']} | {case['rows']} | {cond} | {case['condition_bound']:.1e} | {errors} |")
    data_rows = [c for c in data["cases"] if c["end_to_end_error"]]
    if data_rows:
        lines += [
            "",
            "End to end (data cases): distance to the float64 closed form from float64 patches, i.e. including the "
            "float32 Gram's own rounding.",
            "",
            "| case | " + " | ".join(variants) + " |",
            "|---|" + "---|" * len(variants),
        ]
        for case in data_rows:
            lines.append(f"| {case['case']} | " + " | ".join(cell(case, v, "end_to_end_error") for v in variants) + " |")
    failures = [(c["case"], k, v) for c in data["cases"] for k, v in c["failed_factorisations"].items() if v]
    lines += [
        "",
        "Failed float32 factorisations (`fail` / `*` above): "
        + (", ".join(f"{c} ({k}: {v})" for c, k, v in failures) or "none") + ".",
    ]
    if data.get("summary"):
        lines += ["", "## Summary", "", data["summary"]]
    return "\n".join(lines) + "\n"


def summarise(cases: list[dict]) -> str:
    """Worst errors per variant over data cases by input scale, and over synthetic cases."""
    groups = {f"data {scale}": [c for c in cases if c["kind"] == "data" and c["case"].endswith(scale)] for scale in SCALES}
    groups["synthetic"] = [c for c in cases if c["kind"] == "synthetic"]
    lines = ["Worst solve error per variant (over positive definite float32 Grams; raw variants without failures):", ""]
    for name, members in groups.items():
        members = [c for c in members if c["condition_number"] != "indefinite"]
        if members:
            worst = {
                v: max(c["solve_error"][v] for c in members if not c["failed_factorisations"].get(v))
                for v in members[0]["solve_error"]
            }
            lines.append(f"- {name}: " + ", ".join(f"{v} {e:.1e}" for v, e in worst.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="Fashion-MNIST training images (data cases)")
    parser.add_argument("--quick", action="store_true", help="16 images, small layers, n=147 synthetic only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", default=str(harness.RESULTS_DIR))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    harness.set_cpu_threads(device, args.threads)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    images, source = load_images(16 if args.quick else args.images)
    layers = ["vit_patch7", "stem_7x7_2_rgb"] if args.quick else list(LAYERS)
    cases = data_cases(images, layers, log) + synthetic_cases([147] if args.quick else [147, 768], log)
    data = {
        "meta": harness.environment(device, data=source, images=len(images), **{"lambda": LAMBDA}, outputs=OUTPUTS),
        "cases": cases,
        "summary": summarise(cases),
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    harness.save_json(data, out_dir / f"solve_precision_{args.tag}.json")
    (out_dir / f"solve_precision_{args.tag}.md").write_text(render_markdown(data))
    log(f"done -> {out_dir}/solve_precision_{args.tag}.json/.md\n{data['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
