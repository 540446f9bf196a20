"""Per-step overhead benchmark (report): the markdown of a results JSON written by `overhead.py`.

Imports neither torch nor hf_tract: `python benchmarks/overhead.py --report <json>` re-renders anywhere.
"""

from __future__ import annotations

from typing import Any


def _pct(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%"


def render_markdown(data: dict[str, Any]) -> str:
    """The markdown tables (whole steps, micro-breakdown, first layer alone, profile) of a results file."""
    meta = data["meta"]
    lines = [
        f"# TrAct per-step overhead — {meta['device']} ({meta['device_type']})",
        "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, torch-tract {meta['torch_tract']}, "
        f"git {meta['git_commit'][:12]}{' (hf_tract modified)' if meta.get('hf_tract_dirty') else ''}, "
        f"{meta['started']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    lines += [
        "Step = forward + backward + AdamW step. Overhead = median over rounds of (variant step time / plain "
        "step time in the same round); variants interleaved in one process. Peak = max_memory_allocated "
        "during the variant's steps / plain's.",
        "",
    ]
    names = []
    for setting in data["settings"]:
        for n in list(setting["variants"]) + list(setting["failures"]):
            if n != "plain" and n not in names and not n.endswith("_grad_check"):
                names.append(n)
    header = "| model | dtype | batch | plain ms/step | " + " | ".join(names) + " | rounds |"
    if any(s["variants"] for s in data["settings"]):
        lines += [header, "|" + "---|" * (5 + len(names))]
    for s in data["settings"]:
        cells = []
        for n in names:
            if n in s["variants"]:
                e = s["variants"][n]
                q = e["ratio_quartiles"]
                cell = f"{_pct(e['ratio_median'])}"
                if "q1" in q:
                    cell += f" [{_pct(q['q1'])}, {_pct(q['q3'])}]"
                if e.get("peak_ratio") is not None:
                    cell += f"; mem {_pct(e['peak_ratio'])}"
                cells.append(cell)
            elif n in s["failures"]:
                cells.append("fails: " + s["failures"][n][:90].replace("|", "/"))
            else:
                cells.append("—")
        if not s["variants"]:
            continue
        plain = s["variants"].get("plain", {}).get("step_ms_median", float("nan"))
        lines.append(f"| {s['model']} | {s['dtype']} | {s['batch']} | {plain:.2f} | " + " | ".join(cells) + f" | {s['rounds']} |")
    if any(s["variants"] for s in data["settings"]):
        lines += ["", "Overhead cells: median [quartiles] of the per-round ratio."]
    else:
        lines += ["(--micro-only: no whole-step timing in this file.)"]
    vs = [(s, n, e["vs_official_median"]) for s in data["settings"] for n, e in s["variants"].items()
          if n.startswith("hf_tract") and "vs_official_median" in e]
    if vs:
        lines += ["", "hf_tract step time / official step time (median of per-round ratios): " + ", ".join(
            f"{s['model']} {s['dtype']} {n} {r:.3f}" for s, n, r in vs)]
    micro = [s for s in data["settings"] if s.get("micro")]
    if micro:
        lines += [
            "",
            "## Micro-breakdown (first layer alone, median ms)",
            "",
            "| model | dtype | N rows | n | path | Gram / patches | solve f64 | (factor / triangular) | solve f32 | (factor / triangular) | solve f32 refined | fp32 weight grad | Gram TF32 | Gram fp32 rel err | Gram TF32 rel err | f32-solve rel err | f32-refined rel err |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in micro:
            m = s["micro"]
            if "error" in m:
                lines.append(f"| {s['model']} | {s['dtype']} | error: {m['error'][:80]} |")
                continue

            def f(key, fmt="{:.3f}"):
                return fmt.format(m[key]) if key in m else "—"

            lines.append(
                f"| {s['model']} | {s['dtype']} | {m['num_rows']} | {m['n']} | {m['path']} | "
                f"{f('gram_ms') if 'gram_ms' in m else f('patch_matrix_ms')} | {f('solve_f64_ms')} | "
                f"{f('factor_f64_ms')} / {f('triangular_solve_f64_ms')} | {f('solve_f32_ms')} | "
                f"{f('factor_f32_ms')} / {f('triangular_solve_f32_ms')} | {f('solve_f32r_ms')} | "
                f"{f('weight_grad_fp32_ms')} | "
                f"{f('gram_tf32_ms')} | {f('gram_fp32_rel_err', '{:.1e}')} | {f('gram_tf32_rel_err', '{:.1e}')} | "
                f"{f('solve_f32_rel_err', '{:.1e}')} | {f('solve_f32r_rel_err', '{:.1e}')} |"
            )
    layered = [s for s in data["settings"] if s.get("layer_only") and "ms" in s["layer_only"]]
    if layered:
        lnames = []
        for s in layered:
            lnames += [n for n in s["layer_only"]["ms"] if n not in lnames]
        lines += [
            "",
            "## First layer alone: forward + backward, median ms (interleaved)",
            "",
            "| model | dtype | " + " | ".join(lnames) + " |",
            "|---|---|" + "---|" * len(lnames),
        ]
        for s in layered:
            ms = s["layer_only"]["ms"]
            fails = s["layer_only"].get("failures", {})
            cells = [f"{ms[n]:.3f}" if n in ms else ("fails" if n in fails else "—") for n in lnames]
            lines.append(f"| {s['model']} | {s['dtype']} | " + " | ".join(cells) + " |")
    profiled = [s for s in data["settings"] if s.get("profile")]
    if profiled:
        lines += ["", "## Profile: ops added by hf_tract (self time per step, hf_tract minus plain)", ""]
        for s in profiled:
            p = s["profile"]
            if "error" in p:
                lines.append(f"- {s['model']} {s['dtype']}: profile error: {p['error']}")
                continue
            top = ", ".join(f"`{k}` {v:.3f}" for k, v in p["top_added_ops_ms"][:8])
            lines.append(
                f"- **{s['model']} {s['dtype']}** ({p['clock']}; plain {p['plain_total_ms']:.2f} ms, hf_tract "
                f"{p['hf_tract_total_ms']:.2f} ms): {top}"
            )
            if "top_added_kernels_ms" in p:
                kernels = ", ".join(f"`{k[:60]}` {v:.3f}" for k, v in p["top_added_kernels_ms"][:8])
                lines.append(
                    f"  - kernels (GPU busy time per step: plain {p['plain_kernel_total_ms']:.2f} ms, hf_tract "
                    f"{p['hf_tract_kernel_total_ms']:.2f} ms): {kernels}"
                )
    if data.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in data["errors"]]
    return "\n".join(lines) + "\n"
