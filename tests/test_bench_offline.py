"""`anyserve bench offline` and the GPU benchmark scripts at CPU-tiny scale: the sharegpt-synthetic
length model, --server-arg/--compare parsing, whole offline runs (two engines and a ratio; the
transformers baseline built from a config-only folder) and benchmarks/bench_serving_gpu.py against
a real tiny server."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from engine.bench.datasets import (SHAREGPT_FIT, length_stats, sample_requests, sharegpt_synthetic_lengths,
                                   sharegpt_synthetic_requests)
from engine.bench.offline import (add_bench_offline_args, compare_variants, parse_server_arg, run_bench_offline,
                                  server_arg_overrides, server_cli_flags, workload_lengths)
from engine.bench.serving import add_bench_serving_args, bench_serving_args

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _offline_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_offline_args(parser)
    return parser.parse_args(list(argv))


# ---- sharegpt-synthetic -----------------------------------------------------------------------
def test_sharegpt_synthetic_lengths_respect_the_benchmarks_filter():
    ins, outs = sharegpt_synthetic_lengths(5000, seed=0)
    ins, outs = np.array(ins), np.array(outs)
    assert len(ins) == len(outs) == 5000
    assert ins.min() >= 4 and outs.min() >= 4
    assert ins.max() <= 1024 and (ins + outs).max() <= 2048
    assert len(set(ins.tolist())) > 300        # a spread, not a handful of values


def test_sharegpt_synthetic_means_match_the_published_targets():
    ins, outs = sharegpt_synthetic_lengths(20000, seed=5)
    s_in, s_out = length_stats(ins), length_stats(outs)
    assert s_in["mean"] == pytest.approx(SHAREGPT_FIT.target_mean_input, rel=0.03)
    assert s_out["mean"] == pytest.approx(SHAREGPT_FIT.target_mean_output, rel=0.03)
    # skewed like chat traffic: the median sits well below the mean, the p90 well above
    assert s_in["median"] < 0.8 * s_in["mean"] < s_in["p90"] / 2
    assert s_out["median"] < 0.8 * s_out["mean"] < s_out["p90"] / 2


def test_sharegpt_synthetic_is_deterministic_by_seed():
    assert sharegpt_synthetic_lengths(50, seed=3) == sharegpt_synthetic_lengths(50, seed=3)
    assert sharegpt_synthetic_lengths(50, seed=3) != sharegpt_synthetic_lengths(50, seed=4)


def test_sharegpt_context_len_shrinks_the_set_and_is_checked():
    ins, outs = sharegpt_synthetic_lengths(200, seed=0, context_len=128)
    assert max(ins) <= 64 and max(i + o for i, o in zip(ins, outs)) <= 128
    with pytest.raises(ValueError, match="--sharegpt-context-len"):
        sharegpt_synthetic_lengths(4, seed=0, context_len=8)


def test_serving_dataset_name_sharegpt_synthetic_builds_prompts(llama_tiny):
    tokenizer = AutoTokenizer.from_pretrained(llama_tiny)
    parser = argparse.ArgumentParser()
    add_bench_serving_args(parser)
    args = parser.parse_args(["--dataset-name", "sharegpt-synthetic", "--num-prompts", "30", "--seed", "2"])
    assert args.dataset == "sharegpt-synthetic"
    reqs = sample_requests(args, tokenizer)
    expected_in, expected_out = sharegpt_synthetic_lengths(30, seed=2)
    assert [r.prompt_len for r in reqs] == expected_in and [r.output_len for r in reqs] == expected_out
    assert not set(tokenizer.all_special_ids) & {t for r in reqs for t in r.prompt_ids}
    assert [r.prompt_ids for r in reqs] == [r.prompt_ids for r in sharegpt_synthetic_requests(tokenizer, 30, 2)]


# ---- workload and server-argument flags ---------------------------------------------------------
def test_old_offline_flags_keep_their_meaning():
    ins, outs, _ = workload_lengths(_offline_args("--num-prompts", "40", "--min-input-len", "5",
                                                  "--max-input-len", "9", "--output-len", "7"))
    assert all(5 <= i <= 9 for i in ins) and len(set(ins)) > 1 and outs == [7] * 40


def test_random_len_flags_with_ratio_one_are_fixed_and_bad_ranges_name_the_flag():
    ins, outs, text = workload_lengths(_offline_args("--num-prompts", "6", "--random-input-len", "1024",
                                                     "--random-output-len", "512", "--random-range-ratio", "1"))
    assert ins == [1024] * 6 and outs == [512] * 6 and "prompts 1024 tokens, outputs 512 tokens" in text
    with pytest.raises(ValueError, match="--random-range-ratio"):
        workload_lengths(_offline_args("--random-input-len", "8", "--random-range-ratio", "2"))
    with pytest.raises(ValueError, match="--min-input-len"):
        workload_lengths(_offline_args("--min-input-len", "9", "--max-input-len", "5"))


def test_server_arg_values_take_the_fields_types():
    assert parse_server_arg("mem_fraction_static=0.85") == ("mem_fraction_static", 0.85)
    assert parse_server_arg("cuda-graph-max-bs=256") == ("cuda_graph_max_bs", 256)
    assert parse_server_arg("attention_backend=triton") == ("attention_backend", "triton")
    assert parse_server_arg("disable_radix_cache=true") == ("disable_radix_cache", True)
    assert parse_server_arg("max_running_requests=none") == ("max_running_requests", None)
    with pytest.raises(ValueError, match="not a server argument"):
        parse_server_arg("mem_fraction=0.8")
    with pytest.raises(ValueError, match="cuda_graph_max_bs: cannot read 'lots'"):
        parse_server_arg("cuda_graph_max_bs=lots")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_server_arg("disable_cuda_graph")
    with pytest.raises(ValueError, match="use --model-path"):
        server_arg_overrides(["model_path=/x"])


def test_compare_toggles_a_boolean_from_its_default():
    variants = compare_variants("disable-overlap-schedule", {"max_total_tokens": 4096})
    assert variants == [
        ("disable_overlap_schedule=False", {"max_total_tokens": 4096, "disable_overlap_schedule": False}),
        ("disable_overlap_schedule=True", {"max_total_tokens": 4096, "disable_overlap_schedule": True})]
    assert [v for _, v in compare_variants("enable_metrics", {})] == [{"enable_metrics": True},
                                                                       {"enable_metrics": False}]
    with pytest.raises(ValueError, match="only boolean server arguments can be toggled .*KEY=VALUE"):
        compare_variants("page_size", {})
    # any other field: its default, then the value given
    assert compare_variants("kv-cache-dtype=fp8_e4m3", {}) == [
        ("kv_cache_dtype=auto", {"kv_cache_dtype": "auto"}), ("kv_cache_dtype=fp8_e4m3", {"kv_cache_dtype": "fp8_e4m3"})]
    assert [v for _, v in compare_variants("page_size=16", {})] == [{"page_size": 1}, {"page_size": 16}]
    with pytest.raises(ValueError, match="is the default"):
        compare_variants("kv_cache_dtype=auto", {})
    with pytest.raises(ValueError, match="contradict"):
        compare_variants("disable_cuda_graph", {"disable_cuda_graph": True})


def test_server_cli_flags_spell_the_serve_command():
    assert server_cli_flags({"disable_cuda_graph": True, "disable_overlap_schedule": False,
                             "enable_metrics": False, "mem_fraction_static": 0.8}) == \
        ["--disable-cuda-graph", "--no-enable-metrics", "--mem-fraction-static", "0.8"]


# ---- whole offline runs -------------------------------------------------------------------------
TINY_WORKLOAD = ("--device", "cpu", "--dtype", "float32", "--load-format", "dummy", "--num-prompts", "6",
                 "--random-input-len", "24", "--random-output-len", "8", "--random-range-ratio", "1.0",
                 "--server-arg", "max_total_tokens=2048")


def test_compare_runs_two_fresh_engines_and_reports_the_ratio(llama_tiny, tmp_path, capsys):
    out = tmp_path / "offline.json"
    r = run_bench_offline(_offline_args("--model-path", str(llama_tiny), *TINY_WORKLOAD, "--skip-hf",
                                        "--compare", "disable_overlap_schedule", "--output-file", str(out)))
    runs = r["compare"]["runs"]
    assert [x["label"] for x in runs] == ["disable_overlap_schedule=False", "disable_overlap_schedule=True"]
    assert [x["server_args"]["disable_overlap_schedule"] for x in runs] == [False, True]
    assert all(x["output_tokens"] == 6 * 8 and x["input_tokens"] == 6 * 24 and x["max_total_tokens"] == 2048
               for x in runs)
    assert r["compare"]["ratio"] == pytest.approx(runs[0]["output_tokens_per_s"] / runs[1]["output_tokens_per_s"])
    assert r["anyserve"] == runs[0] and "transformers" not in r
    assert json.loads(out.read_text())["compare"]["ratio"] == pytest.approx(r["compare"]["ratio"])
    table = capsys.readouterr().out
    assert "ratio disable_overlap_schedule=False / disable_overlap_schedule=True" in table


def test_baseline_builds_transformers_from_a_config_only_folder(llama_tiny, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    for f in llama_tiny.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder)
    r = run_bench_offline(_offline_args("--model-path", str(folder), *TINY_WORKLOAD, "--hf-num-prompts", "4",
                                        "--hf-batch-size", "3", "--dataset", "sharegpt-synthetic",
                                        "--sharegpt-context-len", "64"))
    hf = r["transformers"]
    assert hf["random_weights"] and hf["requests"] == 4 and hf["batch_size"] == 3
    assert hf["output_tokens"] == sum(sharegpt_synthetic_lengths(6, seed=0, context_len=64)[1][:4])
    assert hf["generated_tokens"] >= hf["output_tokens"]      # a batch runs to its longest output
    assert r["ratio"] == pytest.approx(r["anyserve"]["output_tokens_per_s"] / hf["output_tokens_per_s"])
    assert r["published"]["output_tokens_per_s"]["sglang"] == 16215.0
    assert r["published"]["anyserve_total_over_sglang"] == pytest.approx(r["anyserve"]["total_tokens_per_s"] / 16215.0)


# ---- benchmarks/bench_serving_gpu.py ------------------------------------------------------------
def test_serving_script_runs_each_concurrency_against_a_real_server(llama_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_serving_gpu
    import suite_summary

    out = tmp_path / "serving.json"
    args = bench_serving_gpu.parse_args([
        "--model-path", str(llama_tiny), "--device", "cpu", "--load-format", "dummy",
        "--concurrency", "1,4", "--num-prompts", "2,6", "--random-input-len", "16", "--random-output-len", "6",
        "--server-arg", "max_total_tokens=2048", "--output-file", str(out)])
    r = bench_serving_gpu.run(args)
    (srv,) = r["servers"]
    assert srv["exit_code"] == 0 and srv["flags"] == ["--max-total-tokens", "2048"]
    assert srv["scheduler_info"]["max_total_tokens"] == 2048
    assert [(lv["max_concurrency"], lv["num_prompts"], lv["completed"], lv["failed"]) for lv in srv["levels"]] == \
        [(1, 2, 2, 0), (4, 6, 6, 0)]
    assert all(lv["total_output_tokens"] == lv["num_prompts"] * 6 and lv["median_ttft_ms"] > 0
               and lv["median_itl_ms"] > 0 for lv in srv["levels"])
    assert (tmp_path / "server-anyserve.log").exists()
    assert json.loads(out.read_text())["servers"][0]["levels"][1]["completed"] == 6
    table = capsys.readouterr().out.splitlines()
    assert table[-3].split()[:2] == ["server", "conc"] and table[-1].split()[:3] == ["anyserve", "4", "6"]
    summary = suite_summary.summarize(tmp_path)
    assert "| serving | anyserve | 4 | 6 |" in summary


def test_serving_script_checks_its_levels(llama_tiny, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_serving_gpu

    with pytest.raises(SystemExit):
        bench_serving_gpu.parse_args(["--model-path", str(llama_tiny), "--concurrency", "1,2", "--num-prompts", "4"])
    args = bench_serving_gpu.parse_args(["--model-path", str(llama_tiny), "--compare", "disable_cuda_graph"])
    assert [label for label, _ in args.variants] == ["disable_cuda_graph=False", "disable_cuda_graph=True"]
    latencies = {f"{s}_{m}_ms": 1.0 for s in ("mean", "median", "p99") for m in ("ttft", "itl")}
    fake = {"servers": [{"label": label, "levels": [
        {"max_concurrency": 1, "num_prompts": 2, "completed": 2, "failed": 0, "output_throughput": tps,
         "request_throughput": 1.0, **latencies}]} for label, tps in (("a", 30.0), ("b", 20.0))],
        "compare": {"ratios": [{"max_concurrency": 1, "output_throughput_ratio": 1.5}]}}
    assert bench_serving_gpu.format_table(fake).splitlines()[-1] == "output tok/s ratio a / b: c=1: 1.50x"


def test_bench_serving_args_know_the_new_dataset_flags():
    args = bench_serving_args(dataset="sharegpt-synthetic", sharegpt_context_len=512)
    assert args.dataset == "sharegpt-synthetic" and args.sharegpt_context_len == 512


def test_suite_summary_lists_batch1_decode_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import suite_summary

    run = {"shape": "llama-3.1-8b", "prompt_len": 512, "output_len": 256, "copy_bandwidth_gb_s": 4256.0,
           "floor_tokens_per_s": 265.0, "decode_tokens_per_s": 231.2, "fraction_of_floor": 0.8725}
    (tmp_path / "decode-ab-default.json").write_text(json.dumps(run))
    summary = suite_summary.summarize(tmp_path)
    assert "| decode-ab-default | llama-3.1-8b | 512 / 256 | 4,256 | 265.0 | 231.2 | 87.2% |" in summary
