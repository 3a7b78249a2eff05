"""The CLI end to end on a tiny model, and every kind of bad input: one clear line, exit 2, nothing half-written."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
import lowbit.pipeline.block
from lowbit.api import quantize_checkpoint
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.presets import resolve_recipe
from toy import byte_tokenizer, calibration, save_toy, write_corpus

SMALL = ["--nsamples", "4", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt")


def run(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_quantize_then_eval(toy_folder, corpus, tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", "--model", toy_folder(), "--recipe", "gptq-w4g128", "--out", out,
                          "--calib", corpus, "--json", *SMALL)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["out_bytes"] < summary["source_bytes"]
    assert {"lowbit_config.json", "quant_report.json", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    # the run's profile: where the block loop's time went (the phases add up to it, less bookkeeping between them:
    # on this toy model, per-block garbage collection is a large share)
    phases = summary["phase_seconds"]
    assert list(phases) == ["capture", "load", "reference pass", "statistics passes", "compress", "final pass", "write"]
    assert all(v >= 0 for v in phases.values()) and 0 < sum(phases.values()) <= summary["seconds"]
    # and its memory: the peak so far at the end of each phase, in the order they ran, the last one the process's
    peaks = summary["peak_rss_after_phase"]
    assert list(peaks) == ["before blocks", "capture", "blocks", "outside blocks"]
    assert 0 < peaks["before blocks"] <= peaks["capture"] <= peaks["blocks"] <= peaks["outside blocks"]
    assert peaks["outside blocks"] <= summary["peak_rss_bytes"]
    code, stdout, _ = run(capsys, "eval", out, "--data", corpus, "--window", "32", "--json")
    assert code == 0
    row = json.loads(stdout)
    assert row["window"] == 32 and row["perplexity"] > 1
    code, fp_out, _ = run(capsys, "eval", toy_folder(), "--data", corpus, "--window", "32", "--json")
    assert json.loads(fp_out)["disk_bytes"] > row["disk_bytes"]


def test_existing_output_is_refused_and_kept(toy_folder, corpus, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = run(capsys, "quantize", "--model", toy_folder(), "--out", out, "--calib", corpus, *SMALL)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "mine.txt").read_text() == "keep me"
    code, _, _ = run(capsys, "quantize", "--model", toy_folder(), "--out", out, "--calib", corpus, "--overwrite", *SMALL)
    assert code == 0 and not (out / "mine.txt").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("model,message", [
    ("/no/such/model", "does not exist"),
    ("meta-llama/Llama-3-8B", "offline"),
])
def test_missing_and_hub_models(model, message, tmp_path, capsys):
    code, _, err = run(capsys, "quantize", "--model", model, "--out", tmp_path / "q")
    assert code == 2 and message in err and not (tmp_path / "q").exists()


def test_truncated_safetensors(toy_folder, corpus, tmp_path, capsys):
    broken = save_toy("llama", tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, _, err = run(capsys, "quantize", "--model", broken, "--out", tmp_path / "q", "--calib", corpus, *SMALL)
    assert code == 2 and "corrupt or truncated" in err and not (tmp_path / "q").exists()


def test_nan_weights(corpus, tmp_path, capsys):
    folder = save_toy("llama", tmp_path / "nan")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(capsys, "quantize", "--model", folder, "--out", tmp_path / "q", "--calib", corpus, *SMALL)
    assert code == 2 and "NaN" in err and "down_proj" in err and not (tmp_path / "q").exists()
    assert leftovers(tmp_path) == []


def test_the_finite_check_reads_every_slice(monkeypatch):
    """Weights are checked for NaN/inf a slice at a time (a whole-tensor check costs ~1.75x the tensor in
    temporaries): a bad value in the last, partial slice is still found."""
    from lowbit.models import checkpoint

    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 7)
    weights = torch.ones(5, 9)
    assert checkpoint.all_finite(weights)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = weights.clone()
        broken[4, 8] = bad  # element 44 of 45: in the last slice, of 3 elements
        assert not checkpoint.all_finite(broken)


def test_tensors_are_copied_out_of_the_map_chunk_by_chunk(tmp_path, monkeypatch):
    """Each tensor leaves the file's memory map in chunks, the copied pages dropped as it goes: the copy is exact
    and owned (the map's pages are not the result's), whatever the chunk size against the page size."""
    from safetensors import safe_open

    from lowbit.models import checkpoint

    tensors = {"a": torch.randn(3, 5000), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(10)}
    save_file(tensors, tmp_path / "t.safetensors")
    for chunk in (1000, 4096, 1 << 20):
        monkeypatch.setattr(checkpoint, "COPY_CHUNK", chunk)
        with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as handle:
            for name, expected in tensors.items():
                mapped = handle.get_tensor(name)
                got = checkpoint.copied_out(mapped)
                assert torch.equal(got, expected) and got.data_ptr() != mapped.data_ptr(), (name, chunk)


def test_unsupported_architecture(corpus, tmp_path, capsys):
    from transformers import BertConfig, BertLMHeadModel

    folder = tmp_path / "bert"
    BertLMHeadModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=320, is_decoder=True)).save_pretrained(folder)
    code, _, err = run(capsys, "quantize", "--model", folder, "--out", tmp_path / "q", "--calib", corpus, *SMALL)
    # its head's bias is tied to another tensor and saved once: lowbit ties only the output embedding, so the
    # strict load names the tensor it cannot find instead of leaving it at its random initialisation
    assert code == 2 and "'cls.predictions.decoder.bias' is missing" in err.strip().splitlines()[-1]


def test_calibration_shorter_than_one_sequence(toy_folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"tiny {i}" for i in range(40)))
    code, _, err = run(capsys, "quantize", "--model", toy_folder(), "--recipe", "gptq-w4g128", "--out", tmp_path / "q",
                       "--calib", short, "--seq-len", "4096")
    assert code == 2 and "fewer than one sequence" in err and not (tmp_path / "q").exists()


def test_corrupt_gguf(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    code, _, err = run(capsys, "eval", bad)
    assert code == 2 and "cannot read GGUF" in err
    assert not any((tmp_path / "cache").rglob("config.json"))


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"steps": [{"type": "bogus"}]}', "unknown recipe step type"),
    ('{"steps": [{"type": "gptq", "bits": 9}]}', "weight bits must be in 2..8"),
    ('{"steps": [{"type": "rtn"}, {"type": "smoothquant"}]}', "out of order"),
])
def test_bad_recipe_files(content, message, toy_folder, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(content)
    code, _, err = run(capsys, "quantize", "--model", toy_folder(), "--recipe", recipe, "--out", tmp_path / "q")
    assert code == 2 and message in err


def test_interrupted_run_leaves_nothing_behind(toy_folder, tmp_path, monkeypatch):
    original = lowbit.pipeline.block.process_block

    def interrupt_on_second_block(ctx, recipe, batch_size, saved, index):
        if index == 1:
            raise KeyboardInterrupt
        return original(ctx, recipe, batch_size, saved, index)

    monkeypatch.setattr(lowbit.pipeline.loop, "process_block", interrupt_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(toy_folder(), resolve_recipe("w4g128"), calibration(n=2, length=16), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []


def test_lazy_checkpoint_path_equals_in_memory_path(toy_folder, tmp_path, monkeypatch):
    """Quantizing from disk block by block gives exactly the model that in-memory quantization gives, with the
    tensors outside the blocks streamed into shards of their own (every tensor counts as large here)."""
    import lowbit
    import lowbit.api
    from toy import toy_model

    monkeypatch.setattr(lowbit.api, "LARGE_TENSOR_BYTES", 1)
    ids = calibration(n=4, length=32)
    recipe = resolve_recipe("gptq-w4g128")
    quantize_checkpoint(toy_folder(), recipe, ids, tmp_path / "disk", batch_size=2, progress=False)
    assert len(list((tmp_path / "disk").glob("rest-*.safetensors"))) == 3  # embed_tokens, final norm, untied lm_head
    in_memory = lowbit.quantize(toy_model("llama"), recipe, ids, batch_size=2)
    test_ids = calibration(n=2, length=24, seed=3)
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "disk")(test_ids).logits, in_memory(test_ids).logits)


def test_recipes_listing(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0 and "gptq-w4g128" in out and "smoothquant-w8a8" in out
    with pytest.raises(LowbitError):
        resolve_recipe("no-such-recipe")


def test_grid_points_resolve_by_name_like_the_presets():
    """Any weight-only sweep point is a recipe name: method, bits, group size (or pc) and act-order."""
    from lowbit.recipe import AWQ, GPTQ, RTN

    gptq = resolve_recipe("gptq-w4g64-actorder")
    assert isinstance(gptq.steps[0], GPTQ) and gptq.steps[0].act_order
    # the measured best act-order (docs/actorder.md): groups in column order, H's off-diagonal shrunk by 10%
    assert gptq.steps[0].static_groups and gptq.steps[0].shrink == 0.1
    from lowbit.presets import sweep_recipe

    assert sweep_recipe("gptq-actorder", 4, 128).steps == resolve_recipe("gptq-w4g128-actorder").steps  # one definition
    assert gptq.steps[0].weights.group_size == 64 and not gptq.steps[0].weights.symmetric
    rtn = resolve_recipe("w3pc")
    assert isinstance(rtn.steps[0], RTN) and rtn.steps[0].weights.granularity == "channel" and rtn.steps[0].weights.bits == 3
    assert [type(s) for s in resolve_recipe("awq-gptq-w4g32").steps] == [AWQ, GPTQ]
    assert resolve_recipe("w4g128") == resolve_recipe("w4g128")  # a preset keeps its own definition
    for bad in ("awq-w4g64-actorder", "gptq-w9g64", "w4g0"):
        with pytest.raises(LowbitError, match="unknown recipe"):
            resolve_recipe(bad)


def test_data_free_recipe_needs_no_calibration_text_unless_measured(toy_folder, tmp_path, capsys):
    """RTN reads no calibration inputs: quantize runs without a forward pass (no text needed, errors n/a);
    --measure runs the calibration text through it and reports errors."""
    code, out, _ = run(capsys, "quantize", "--model", toy_folder(), "--recipe", "w4g128", "--out", tmp_path / "a",
                       "--calib", tmp_path / "missing.txt", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["calibration"]["n_sequences"] == 0 and summary["mean_linear_error"] is None
    code, out, _ = run(capsys, "quantize", "--model", toy_folder(), "--recipe", "w4g128", "--out", tmp_path / "b",
                       "--measure", "--json", *SMALL)
    assert code == 0 and json.loads(out)["mean_linear_error"] > 0


def test_transforms_option_reapplies_an_earlier_awq_run(toy_folder, corpus, tmp_path, capsys):
    recipe = tmp_path / "awq.json"
    recipe.write_text(json.dumps({"steps": [{"type": "awq", "bits": 4, "group_size": 32, "n_grid": 4,
                                             "replay_sequences": 2, "clip_tokens": 32}]}))
    first, again = tmp_path / "first", tmp_path / "again"
    assert run(capsys, "quantize", "--model", toy_folder(), "--recipe", recipe, "--out", first, "--calib", corpus, *SMALL)[0] == 0
    code, _, _ = run(capsys, "quantize", "--model", toy_folder(), "--recipe", recipe, "--out", again, "--calib", corpus,
                     "--transforms", first, "--seed", "3", *SMALL)
    assert code == 0
    assert load_file(first / "transforms.safetensors").keys() == load_file(again / "transforms.safetensors").keys()
    saved = json.loads((again / "lowbit_config.json").read_text())["recipe"]["steps"][0]
    assert saved["artifact"] == str(first)
    code, _, err = run(capsys, "quantize", "--model", toy_folder(), "--recipe", recipe, "--out", tmp_path / "x",
                       "--calib", corpus, "--transforms", tmp_path / "missing", *SMALL)
    assert code == 2 and "cannot read transform artifact" in err and not (tmp_path / "x").exists()


def test_compare_writes_table_plot_and_resumes(toy_folder, corpus, tmp_path, capsys, monkeypatch):
    import lowbit.cli.compare_cmd as compare_cmd

    argv = ["compare", "--model", toy_folder(), "--recipes", "w8", "w3g128", "--out", tmp_path / "models",
            "--results", tmp_path / "results", "--calib", corpus, "--data", corpus, "--window", "32", "--no-inspect",
            *SMALL]
    code, _, _ = run(capsys, *argv)
    assert code == 0
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    rows = {r["recipe"]: r for r in results["rows"]}
    assert list(rows) == ["float32", "w8", "w3g128"]
    assert rows["w3g128"]["disk_bytes"] < rows["w8"]["disk_bytes"] < rows["float32"]["disk_bytes"]
    assert rows["w8"]["peak_rss_bytes"] > 0 and rows["w8"]["quantize_seconds"] > 0
    report = (tmp_path / "results" / "report.md").read_text()
    assert "| w3g128 |" in report and "## Recommendation" in report and "Pareto front" in report
    assert "<td>w3g128</td>" in (tmp_path / "results" / "report.html").read_text()
    for png in ("pareto.png", "ppl_vs_bits.png", "layer_error.png"):
        assert (tmp_path / "results" / png).read_bytes()[:4] == b"\x89PNG"
    assert len(rows["w3g128"]["block_errors"]) == 2  # the toy model's two blocks

    def no_requantizing(*_args):
        raise AssertionError("--resume must reuse the rows it already has")

    monkeypatch.setattr(compare_cmd, "quantize_in_child", no_requantizing)
    stale = json.loads((tmp_path / "results" / "results.json").read_text())
    stale["rows"][1]["description"] = "an older description"  # derived text: a resumed run writes today's
    (tmp_path / "results" / "results.json").write_text(json.dumps(stale))
    code, _, _ = run(capsys, *argv, "--resume")
    assert code == 0
    assert json.loads((tmp_path / "results" / "results.json").read_text())["rows"] == results["rows"]

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_cmd, "quantize_in_child", interrupted)
    # w8 is reused and written, then a new row is interrupted: w3g128, measured earlier and not reached, must survive
    argv[argv.index("w8") + 1 : argv.index("w8") + 1] = ["w4g128"]
    code, _, _ = run(capsys, *argv, "--resume")
    assert code == 130
    assert json.loads((tmp_path / "results" / "results.json").read_text())["rows"] == results["rows"]


def test_compare_sweep_builds_the_grid_and_reuses_searched_scales(toy_folder, corpus, tmp_path, capsys):
    code, stdout, _ = run(
        capsys, "compare", toy_folder(), "--methods", "rtn", "gptq", "--bits", "3", "--group-sizes", "32", "0",
        "--recipes", "smoothquant-w8a8", "smoothquant-w8a8-static", "--out", tmp_path / "m", "--calib", corpus,
        "--data", corpus, "--window", "32", *SMALL,
    )
    assert code == 0
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    rows = {r["recipe"]: r for r in results["rows"]}
    assert list(rows)[1:3] == ["smoothquant-w8a8", "smoothquant-w8a8-static"]
    assert sorted(list(rows)[3:]) == sorted(["w3g32", "w3pc", "gptq-w3g32", "gptq-w3pc"])
    assert rows["gptq-w3pc"]["config"]["steps"][0]["weights"]["granularity"] == "channel"
    # the second SmoothQuant row re-applied the first row's scales instead of searching again
    assert rows["smoothquant-w8a8"]["transforms_from"] is None
    assert rows["smoothquant-w8a8-static"]["transforms_from"] == "smoothquant-w8a8"
    # at equal bits and grid GPTQ's layer error is below RTN's, and groups beat one range per channel
    for grid in ("g32", "pc"):
        assert rows[f"gptq-w3{grid}"]["mean_linear_error"] < rows[f"w3{grid}"]["mean_linear_error"]
    assert rows["w3g32"]["mean_linear_error"] < rows["w3pc"]["mean_linear_error"]
    # the recommendation starts from the outlier diagnosis of the same calibration text
    findings = json.loads((tmp_path / "m" / "inspect" / "inspect.json").read_text())["findings"]
    assert f"- {findings[0]}" in (tmp_path / "m" / "report.md").read_text()


def test_compare_ranks_outlier_methods_consistently_with_their_errors(trained_folder, corpus, tmp_path, capsys):
    """On a trained tiny model with outlier channels: wherever two recipes' layer errors differ clearly (3x or
    more; below that perplexity differences on a toy are noise), the ranking by perplexity agrees, and naive
    per-tensor W8A8 ranks below SmoothQuant's repair of it."""
    from lowbit.evaluation.recommend import ranking

    code, _, _ = run(capsys, "compare", trained_folder, "--recipes", "w8", "w8a8-naive", "smoothquant-w8a8-static",
                     "w3g128", "--out", tmp_path / "m", "--calib", corpus, "--data", corpus, "--window", "32",
                     "--no-inspect", *SMALL)
    assert code == 0
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    order = ranking(results["rows"])
    rows = results["rows"][1:]
    clear = [(a, b) for a in rows for b in rows if b["mean_linear_error"] >= 3 * a["mean_linear_error"]]
    assert len(clear) >= 3
    for better, worse in clear:
        assert order.index(better["recipe"]) < order.index(worse["recipe"]), (better["recipe"], worse["recipe"])
    assert order.index("smoothquant-w8a8-static") < order.index("w8a8-naive")


def test_compare_needs_something_to_compare(tmp_path, capsys):
    code, _, err = run(capsys, "compare", "--out", tmp_path / "m")
    assert code == 2 and "nothing to compare" in err and not (tmp_path / "m").exists()


def test_report_commands_refuse_a_file_as_their_output_folder(toy_folder, corpus, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for argv in (["inspect", toy_folder(), "--calib", corpus, "--out", taken, *SMALL],
                 ["compare", toy_folder(), "--methods", "rtn", "--out", taken],
                 ["compare", toy_folder(), "--methods", "rtn", "--out", tmp_path / "m", "--results", taken],
                 ["bench", toy_folder(), "--baseline", toy_folder(), "--results", taken]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "is not a directory" in err, argv
    assert taken.read_text() == "not a folder" and not (tmp_path / "m").exists()


def test_compare_checks_every_recipe_before_working(toy_folder, tmp_path, capsys):
    code, _, err = run(capsys, "compare", "--model", toy_folder(), "--recipes", "w8", "no-such-recipe", "--out", tmp_path / "m")
    assert code == 2 and "unknown recipe 'no-such-recipe'" in err and not (tmp_path / "m").exists()


def test_inspect_command_writes_json_and_plots(toy_folder, corpus, tmp_path, capsys):
    code, stdout, _ = run(capsys, "inspect", toy_folder(), "--calib", corpus, "--out", tmp_path / "i", "--json", *SMALL)
    assert code == 0
    report = json.loads(stdout)
    assert report == json.loads((tmp_path / "i" / "inspect.json").read_text())
    assert report["inputs"][0]["name"] == "model.layers.0.self_attn.q_proj" and report["inputs"][0]["ratio"] > 1
    for png in ("channels.png", "heatmap.png", "zero_share.png"):
        assert (tmp_path / "i" / png).read_bytes()[:4] == b"\x89PNG"
    channels = load_file(tmp_path / "i" / "channels.safetensors")
    assert channels["model.layers.0.self_attn.q_proj.absmax"].max().item() == pytest.approx(report["inputs"][0]["max_abs"])
    assert channels["residual.absmax"].shape == (2, 64)
    code, stdout, _ = run(capsys, "outliers", "--model", toy_folder(), "--calib", corpus, "--out", tmp_path / "j", *SMALL)
    assert code == 0 and "Most stretched input" in stdout  # the old name still works
    code, _, err = run(capsys, "inspect", toy_folder(), "--calib", corpus, "--ratio", "0.5")
    assert code == 2 and "--ratio > 1" in err


def test_peak_rss_is_the_child_processs_own():
    """ru_maxrss of an exec'd child inherits its parent's high-water mark; the reported peak must not."""
    import subprocess
    import sys

    from lowbit.cli.common import peak_rss_bytes

    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: 400 MiB resident in this process
    code = "from lowbit.cli.common import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < peak_rss_bytes() - 300 * 2**20
    del ballast


def test_json_output_stays_parseable_when_lowbit_warns(toy_folder, tmp_path):
    """A real process (in-process, pytest's own log handlers would hide where the CLI's logs go)."""
    import subprocess
    import sys

    short = write_corpus(tmp_path / "short.txt", repeats=12)  # fewer tokens than 64 x 32: a logged warning
    child = subprocess.run(
        [sys.executable, "-m", "lowbit.cli.main", "quantize", "--model", str(toy_folder()), "--recipe", "w8",
         "--out", str(tmp_path / "q"), "--calib", str(short), "--nsamples", "64", "--seq-len", "32", "--measure", "--json"],
        capture_output=True, text=True,
    )
    assert child.returncode == 0, child.stderr
    assert "holds only" in child.stderr
    assert json.loads(child.stdout)["calibration"]["n_sequences"] < 64


def test_generate_streams_the_greedy_continuation_of_a_quantized_model(toy_folder, corpus, tmp_path, capsys):
    out = tmp_path / "q"
    assert run(capsys, "quantize", "--model", toy_folder(), "--recipe", "w8", "--out", out, "--calib", corpus, *SMALL)[0] == 0
    code, stdout, _ = run(capsys, "generate", out, "--prompt", "The quick", "--max-new-tokens", "6", "--backend", "exact")
    assert code == 0
    model = lowbit.load(out)
    tokenizer = byte_tokenizer()
    ids = tokenizer("The quick", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    assert stdout.strip() == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()
    code, _, err = run(capsys, "generate", out, "--prompt", "x", "--chat")
    assert code == 2 and "no chat template" in err


def test_bench_measures_baselines_and_models_in_children(toy_folder, corpus, tmp_path, capsys):
    out = tmp_path / "q"
    assert run(capsys, "quantize", "--model", toy_folder(), "--recipe", "w4g128", "--out", out, "--calib", corpus, *SMALL)[0] == 0
    code, _, _ = run(capsys, "bench", out, "--baseline", toy_folder(), "--prefill-tokens", "16", "--new-tokens", "3",
                     "--repeats", "1", "--results", tmp_path / "r")
    assert code == 0
    results = json.loads((tmp_path / "r" / "runtime.json").read_text())
    assert results["machine"]["threads"] >= 1 and results["machine"]["cpu"]  # what the speeds were measured on
    rows = results["rows"]
    assert [(r["dtype"], r["backend"]) for r in rows] == [
        ("float32", "-"), ("bfloat16", "-"), ("as stored", "exact"), ("as stored", "fast")]
    assert rows[2]["disk_bytes"] < rows[1]["disk_bytes"] == rows[0]["disk_bytes"]  # bf16 is loaded from the fp32 file
    assert rows[2]["tensor_bytes"] < rows[1]["tensor_bytes"] < 0.51 * rows[0]["tensor_bytes"]
    assert all(r["prefill_tokens_per_second"] > 0 and set(r["decode_tokens_per_second"]) == {"1", "8"} for r in rows)
    assert "(1.00x)" in (tmp_path / "r" / "runtime.md").read_text()
    code, _, err = run(capsys, "bench", tmp_path / "missing", "--baseline", toy_folder())
    assert code == 2 and "missing" in err
