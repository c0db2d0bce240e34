"""`forethought generate` at the command line: output on success, one `error:` line and exit 2 on bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SHAPE, gguf_tensors, write_gguf
from gguf import GGMLQuantizationType

from forethought import generate
from forethought.cli import main

STORY = "Once upon a time, there was a little"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err


# --- success ---------------------------------------------------------------------------------------------------


def test_end_to_end_generate_subprocess(real_lm):
    """The installed command continues the story greedily: stdout is the prompt + the engine's 30 tokens."""
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("FORETHOUGHT_TEST_THREADS", "1")}
    cmd = [sys.executable, "-m", "forethought", "generate", STORY, "-n", "30", "--temperature", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith(STORY) and len(proc.stdout.strip()) > len(STORY) + 20
    expected = generate(real_lm.model, real_lm.tokenizer.encode(STORY), 30, stop_ids=(2,))
    assert proc.stdout == STORY + real_lm.tokenizer.decode(expected.new_ids) + "\n"


def test_generate_json_on_tiny_gguf(capsys, tiny_gguf):
    """--json prints one object whose ids, text and cache size agree with each other."""
    code, out, _ = run(capsys, "generate", "The quick brown", "-m", str(tiny_gguf), "-n", "12", "-t", "0", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["stop_reason"] in ("eos", "max_tokens")
    n_new, n_prompt = len(result["new_ids"]), len(result["prompt_ids"])
    assert n_new == 12 or result["new_ids"][-1] == 0
    assert result["kv_cache_bytes"] == (n_prompt + n_new - 1) * 2 * 2 * 2 * 16 * 4


def test_no_cache_prints_the_same_text(capsys, tiny_gguf):
    args = ("generate", "The quick brown", "-m", str(tiny_gguf), "-n", "20", "-t", "0")
    code, cached, _ = run(capsys, *args)
    code2, recomputed, _ = run(capsys, *args, "--no-cache")
    assert code == code2 == 0 and cached == recomputed and cached.startswith("The quick brown")


def test_same_seed_same_sampled_text(capsys, tiny_gguf):
    args = ("generate", "The quick brown", "-m", str(tiny_gguf), "-n", "20", "-t", "1.2", "--seed", "7")
    assert run(capsys, *args)[1] == run(capsys, *args)[1]


def test_float64_runs(capsys, tiny_gguf):
    """float64 is an accepted dtype (for experiments) and gives the float32 greedy text on the tiny model."""
    args = ("generate", "The quick brown", "-m", str(tiny_gguf), "-n", "10", "-t", "0")
    assert run(capsys, *args, "--dtype", "float64")[:2] == run(capsys, *args)[:2]


def test_int8_runs(capsys, tiny_gguf):
    """--dtype int8 (8-bit weights) generates on the tiny model, as greedy text of the same length."""
    code, out, err = run(
        capsys, "generate", "The quick brown", "-m", str(tiny_gguf), "-n", "10", "-t", "0", "--dtype", "int8"
    )
    assert code == 0, err
    assert out.startswith("The quick brown")


def test_info_json(capsys, tiny_gguf):
    code, out, _ = run(capsys, "info", "-m", str(tiny_gguf), "--json")
    assert code == 0
    assert json.loads(out)["config"]["n_kv_heads"] == SHAPE["kv_heads"]


# --- bad input: exit 2, one line, no traceback -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, llama_state, llama_dir, tokenizer, smollm2_dir):
    """Files a user might point --model at by mistake, each broken in a different way."""
    d = tmp_path_factory.mktemp("bad")
    tensors = gguf_tensors(llama_state, SHAPE["heads"], SHAPE["kv_heads"])
    (d / "junk.gguf").write_bytes(b"this is not a model\n" * 500)
    (d / "empty.gguf").write_bytes(b"")
    with open(smollm2_dir / "SmolLM2-135M-Instruct.Q4_1.gguf", "rb") as f:
        (d / "real-1mb.gguf").write_bytes(f.read(1 << 20))
    whole = write_gguf(d / "whole.gguf", tensors, tokenizer).read_bytes()
    (d / "tiny-cut.gguf").write_bytes(whole[: len(whole) * 2 // 3])
    write_gguf(d / "mamba.gguf", tensors, tokenizer, arch="mamba")
    write_gguf(d / "kv-heads-3.gguf", tensors, tokenizer, shape={"kv_heads": 3})
    write_gguf(d / "heads-0.gguf", tensors, tokenizer, shape={"heads": 0})
    for name, file, text in [
        ("hf-no-hidden-size", "config.json", json.dumps({"model_type": "llama", "num_hidden_layers": 2})),
        ("hf-bad-tokenizer-config", "tokenizer_config.json", "{not json"),
    ]:
        shutil.copytree(llama_dir, d / name)
        (d / name / file).write_text(text)
    # Q8_1 is a valid GGUF type that gguf-py cannot dequantize: 32 values per 40-byte block.
    down = tensors.pop("blk.0.ffn_down.weight")
    q8_1 = np.zeros((down.shape[0], down.shape[1] // 32 * 40), dtype=np.uint8)
    write_gguf(d / "q8_1.gguf", tensors, tokenizer, raw={"blk.0.ffn_down.weight": (q8_1, GGMLQuantizationType.Q8_1)})
    (d / "empty-folder").mkdir()
    (d / "hf-mamba").mkdir()
    (d / "hf-mamba" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    return d


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", ""], "empty"),
        (["generate", "hi", "-n", "abc"], "-n"),
        (["generate", "hi", "--top-p", "2"], "top-p"),
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-k", "-3"], "top-k"),
        (["generate", "hi", "--no-such-flag"], "no-such-flag"),
        (["generate"], "prompt"),
        (["no-such-command"], "no-such-command"),
        (["generate", "hi", "-m", "/no/such/model.gguf"], "/no/such/model.gguf"),
        (["generate", "hi", "-m", "no-such-named-model"], "no-such-named-model"),
    ],
)
def test_bad_arguments(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert_one_error_line(code, err)
    assert message in err and out == ""


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("junk.gguf", "not a GGUF file"),
        ("empty.gguf", "empty"),
        ("real-1mb.gguf", "truncated"),
        ("tiny-cut.gguf", "truncated"),
        ("mamba.gguf", "mamba"),
        ("q8_1.gguf", "Q8_1"),
        ("empty-folder", "empty-folder"),
        ("hf-mamba", "mamba"),
    ],
)
def test_bad_model_files(capsys, bad_files, name, message):
    code, out, err = run(capsys, "generate", "hi", "-m", str(bad_files / name), "-n", "2")
    assert_one_error_line(code, err)
    assert message in err and out == ""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-n", "500"], "context length 128"),
        (["-n", "-1"], ">= 0"),
        (["--device", "cuda"], "cuda"),
        (["--device", "tpu"], "tpu"),
        (["--dtype", "int4"], "int4"),
        (["--chat"], "chat template"),
    ],
)
def test_bad_settings_for_a_valid_model(capsys, tiny_gguf, flags, message):
    """Prompt + -n over the context length, a device this machine lacks, an unknown dtype, --chat without template."""
    code, _, err = run(capsys, "generate", "hi there", "-m", str(tiny_gguf), *flags)
    assert_one_error_line(code, err)
    assert message in err


def test_rejected_prompt_prints_nothing_on_stdout(capsys, tiny_gguf):
    code, out, _ = run(capsys, "generate", "hi there", "-m", str(tiny_gguf), "-n", "500")
    assert code == 2 and out == ""


@pytest.mark.parametrize("name", ["kv-heads-3.gguf", "heads-0.gguf", "hf-no-hidden-size", "hf-bad-tokenizer-config"])
def test_bad_model_metadata(capsys, bad_files, name):
    """Impossible shapes and unreadable config files are user errors too: exit 2, one line."""
    code, out, err = run(capsys, "generate", "hi", "-m", str(bad_files / name), "-n", "2")
    assert_one_error_line(code, err)
