"""Odd command lines: each is one `error:` line with exit code 2, or a behaviour the help and README state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from forethought.cli import main
from forethought.model.sampling import SamplingParams, sampling_distribution


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]


def generate_json(capsys, model: Path, *flags: str, prompt: str = "Once upon a time") -> dict:
    code, out, err = run(capsys, "generate", "-m", str(model), "--json", *flags, prompt)
    assert code == 0, err
    return json.loads(out)


def test_non_utf8_argv_is_a_clean_error(capsys, llama_dir: Path) -> None:
    # Python hands undecodable argv bytes over as lone surrogates (surrogateescape): b"\xff" -> "\udcff".
    code, _, err = run(capsys, "generate", "-m", str(llama_dir), "-n", "2", "caf\udcff")
    assert_clean_error(code, err, "UTF-8")


@pytest.mark.parametrize("seed", [str(2**64), "-1", str(10**30)])
def test_out_of_range_seed_is_a_clean_error(capsys, llama_dir: Path, seed: str) -> None:
    code, _, err = run(capsys, "generate", "-m", str(llama_dir), "-n", "2", "--seed", seed, "hi")
    assert_clean_error(code, err, "--seed")


def test_largest_seed_works(capsys, llama_dir: Path) -> None:
    a = generate_json(capsys, llama_dir, "-n", "4", "--seed", str(2**64 - 1))
    b = generate_json(capsys, llama_dir, "-n", "4", "--seed", str(2**64 - 1))
    assert a["new_ids"] == b["new_ids"]


@pytest.mark.parametrize("temperature", ["1e-30", "1e-45"])
def test_tiny_temperature_is_greedy(capsys, llama_dir: Path, temperature: str) -> None:
    greedy = generate_json(capsys, llama_dir, "-n", "8", "-t", "0")
    tiny = generate_json(capsys, llama_dir, "-n", "8", "-t", temperature, "--seed", "3")
    assert tiny["new_ids"] == greedy["new_ids"]


def test_tiny_temperature_distribution_is_one_hot_and_ties_share() -> None:
    logits = torch.tensor([1.0, 3.0, -2.0, 3.0])
    probs = sampling_distribution(logits, SamplingParams(temperature=1e-45))
    assert torch.equal(probs, torch.tensor([0.0, 0.5, 0.0, 0.5]))
    control = sampling_distribution(logits, SamplingParams(temperature=1.0))  # an ordinary one is not one-hot
    assert (control > 0).all()


def test_zero_new_tokens(capsys, llama_dir: Path) -> None:
    summary = generate_json(capsys, llama_dir, "-n", "0")
    assert summary["new_ids"] == [] and summary["decode_tokens_per_second"] is None
    code, out, err = run(capsys, "generate", "-m", str(llama_dir), "-n", "0", "Once upon a time")
    assert code == 0 and out.startswith("Once upon a time") and "nan" not in err.lower()


def test_nonfinite_logits_are_a_clean_error() -> None:
    from forethought.errors import ForethoughtError
    from forethought.model.sampling import sample

    with pytest.raises(ForethoughtError, match="NaN"):
        sample(torch.tensor([0.0, float("nan")]), SamplingParams(temperature=0), torch.Generator())
    with pytest.raises(ForethoughtError, match="NaN"):
        sample(torch.tensor([0.0, float("nan")]), SamplingParams(temperature=0.7), torch.Generator())


CHAT = "<|im_start|>user\n{{ messages[0]['content'] }}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def chat_model(llama_dir: Path, tmp_path: Path):
    """The tiny Llama with a chat template of our choosing."""

    def with_template(template) -> Path:
        folder = tmp_path / "chat"
        if not folder.exists():
            shutil.copytree(llama_dir, folder)
        path = folder / "tokenizer_config.json"
        settings = json.loads(path.read_text())
        settings["chat_template"] = template
        path.write_text(json.dumps(settings))
        return folder

    return with_template


@pytest.mark.parametrize(
    "template", ["{% if %}", 42, ["no", "names"], "{{ raise_exception('roles must alternate') }}", "{{ 1 / 0 }}"]
)
def test_broken_chat_template_is_a_clean_error(capsys, chat_model, template) -> None:
    code, _, err = run(capsys, "generate", "-m", str(chat_model(template)), "--chat", "-n", "2", "hi")
    assert_clean_error(code, err, "chat template")


def test_chat_prints_the_answer_and_show_template_keeps_the_markers(capsys, chat_model) -> None:
    folder = chat_model(CHAT)
    code, answer, err = run(capsys, "generate", "-m", str(folder), "--chat", "-n", "6", "-t", "0", "hi")
    assert code == 0, err
    assert "<|im_start|>" not in answer and "user" not in answer
    code, shown, _ = run(capsys, "generate", "-m", str(folder), "--chat", "--show-template", "-n", "6", "-t", "0", "hi")
    assert code == 0 and shown.startswith("<|im_start|>user\nhi<|im_end|>")
    assert shown.rstrip("\n").endswith(answer.rstrip("\n"))  # the same answer, after the template
    named = chat_model([{"name": "default", "template": CHAT}])  # HF's list of named templates
    assert run(capsys, "generate", "-m", str(named), "--chat", "-n", "6", "-t", "0", "hi")[1] == answer


def test_trace_save_never_creates_folders(capsys, llama_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir" / "x.safetensors"
    code, _, err = run(capsys, "trace", "hi", "-m", str(llama_dir), "--save", str(missing))
    assert_clean_error(code, err, "does not exist")
    assert not (tmp_path / "nonexistent").exists()
    code, _, err = run(capsys, "trace", "hi", "-m", str(llama_dir), "--save", str(tmp_path))
    assert_clean_error(code, err, "is a folder")
    code, _, err = run(capsys, "trace", "hi", "-m", str(llama_dir), "--save", str(tmp_path / "t.safetensors"))
    assert code == 0 and (tmp_path / "t.safetensors").is_file(), err


@pytest.mark.parametrize("eos", ['"2"', '["2", "3"]', "[true]", "2.5", "[1.0, 2]", "-1", "[]", '{"id": 2}'])
def test_generation_config_eos_of_the_wrong_type_is_one_line(capsys, llama_dir: Path, tmp_path: Path, eos: str):
    """HF's generation_config.json names the stop token; a string (or bools, floats) there was a TypeError."""
    folder = tmp_path / "model"
    shutil.copytree(llama_dir, folder)
    (folder / "generation_config.json").write_text(f'{{"eos_token_id": {eos}}}')
    code, _, err = run(capsys, "generate", "-m", str(folder), "-n", "1", "hi")
    assert_clean_error(code, err, "eos_token_id")


def test_output_paths_name_the_path_and_the_reason(tmp_path: Path, monkeypatch):
    """The shared checks: a file where a folder belongs (ENOTDIR), a folder where a file belongs, a read-only
    place (EROFS, from statvfs), and a write the disk refuses (ENOSPC) with nothing left behind."""
    import errno

    import forethought.paths as paths
    from forethought.errors import ForethoughtError

    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ForethoughtError, match=r"--save .*f/t\.safetensors: cannot write: .*\(ENOTDIR\)"):
        paths.output_file(a_file / "t.safetensors", "--save")
    with pytest.raises(ForethoughtError, match="is a folder"):
        paths.output_file(tmp_path, "--save")
    with pytest.raises(ForethoughtError, match=r"--out .*: cannot write: .*is a file \(ENOTDIR\)"):
        paths.output_dir(a_file, "--out")
    monkeypatch.setattr(paths.os, "access", lambda *a: False)
    monkeypatch.setattr(paths, "_read_only", lambda folder: True)
    with pytest.raises(ForethoughtError, match=r"Read-only file system \(EROFS\)"):
        paths.output_file(tmp_path / "x.png", "--plot")
    monkeypatch.undo()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "out.json"
    target.write_text("old")
    monkeypatch.setattr(paths.os, "fsync", disk_full)
    with pytest.raises(ForethoughtError, match=r"out\.json: cannot write: No space left on device \(ENOSPC\)"):
        paths.atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f", "out.json"]
