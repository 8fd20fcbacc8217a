"""One markdown table of every result JSON that gpu_suite.sh wrote (offline, serving, batch-1
decode and structured output), for pasting into RESULTS.md.

    python benchmarks/suite_summary.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def offline_rows(stage: str, r: dict[str, Any]) -> list[str]:
    runs = r["compare"]["runs"] if "compare" in r else [r["anyserve"]]
    rows = []
    for x in runs:
        name = f"anyserve {x['label']}" if "compare" in r else "anyserve"
        rows.append(f"| {stage} | {r['workload']} | {name} | {x['output_tokens_per_s']:,.0f} | "
                    f"{x['total_tokens_per_s']:,.0f} | {x['requests_per_s']:.2f} |")
    if "transformers" in r:
        t = r["transformers"]
        rows.append(f"| {stage} | first {t['requests']} prompts | transformers (batch {t['batch_size']}) | "
                    f"{t['output_tokens_per_s']:,.0f} | {t['total_tokens_per_s']:,.0f} | {t['requests_per_s']:.2f} |")
    notes = []
    if "compare" in r:
        notes.append(f"{runs[0]['label']} / {runs[1]['label']} = {r['compare']['ratio']:.2f}x")
    if "ratio" in r:
        notes.append(f"anyserve / transformers = {r['ratio']:.2f}x")
    if "published" in r:
        notes.append(f"anyserve / published SGLang 16,215 = {r['published']['anyserve_over_sglang']:.2f}x")
    return rows + [f"| {stage} | | **{n}** | | | |" for n in notes]


def serving_rows(stage: str, r: dict[str, Any]) -> list[str]:
    rows = []
    for srv in r["servers"]:
        for lv in srv["levels"]:
            rows.append(f"| {stage} | {srv['label']} | {lv['max_concurrency']} | {lv['num_prompts']} | "
                        f"{lv['output_throughput']:,.0f} | {lv['mean_ttft_ms']:.1f} / {lv['median_ttft_ms']:.1f} / "
                        f"{lv['p99_ttft_ms']:.1f} | {lv['mean_itl_ms']:.2f} / {lv['median_itl_ms']:.2f} / "
                        f"{lv['p99_itl_ms']:.2f} |")
    for x in r.get("compare", {}).get("ratios", []):
        rows.append(f"| {stage} | ratio | {x['max_concurrency']} | | **{x['output_throughput_ratio']:.2f}x** | | |")
    return rows


def decode_row(stage: str, r: dict[str, Any]) -> str:
    return (f"| {stage} | {r['shape']} | {r['prompt_len']} / {r['output_len']} | {r['copy_bandwidth_gb_s']:,.0f} | "
            f"{r['floor_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['fraction_of_floor']:.1%} |")


def grammar_rows(stage: str, r: dict[str, Any]) -> list[str]:
    rows = []
    for x in r["results"]:
        on_off = f"{x['overlap_on_off']:.3f}" if "overlap_on_off" in x else ""
        rows.append(f"| {stage} | {x['batch_size']} | {x['mode']} | {'on' if x['overlap'] else 'off'} | "
                    f"{x['decode_tokens_per_s']:,.1f} | {x['vs_free']:.3f} | {on_off} |")
    return rows


def summarize(out_dir: Path) -> str:
    offline, serving, decode, grammar = [], [], [], []
    for path in sorted(out_dir.glob("*.json")):
        r = json.loads(path.read_text())
        if "anyserve" in r:
            offline += offline_rows(path.stem, r)
        elif "servers" in r:
            serving += serving_rows(path.stem, r)
        elif "decode_tokens_per_s" in r:
            decode.append(decode_row(path.stem, r))
        elif "schema" in r:
            grammar += grammar_rows(path.stem, r)
    env = out_dir / "env.txt"
    lines = [env.read_text().strip(), ""] if env.exists() else []
    if offline:
        lines += ["| stage | workload | engine | output tok/s | total tok/s | req/s |",
                  "| --- | --- | --- | --- | --- | --- |", *offline, ""]
    if serving:
        lines += ["| stage | server | max concurrency | requests | output tok/s | TTFT mean / median / p99 ms "
                  "| ITL mean / median / p99 ms |", "| --- | --- | --- | --- | --- | --- | --- |", *serving, ""]
    if decode:
        lines += ["| stage | shape | prompt / output | copy GB/s | floor tok/s | decode tok/s | of the floor |",
                  "| --- | --- | --- | --- | --- | --- | --- |", *decode, ""]
    if grammar:
        lines += ["| stage | batch | mode | overlap | decode tok/s | vs free | overlap on / off |",
                  "| --- | --- | --- | --- | --- | --- | --- |", *grammar]
    return "\n".join(lines).rstrip() if offline or serving or decode or grammar else f"no result JSON in {out_dir}"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(summarize(Path(sys.argv[1])))
