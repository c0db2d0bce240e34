"""The Feedback Transformer and the GRU as engine families: checked against references written here from the
paper's equations and from torch's multi-layer GRU, and run through the trace API, the CLI and the viewer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from forethought.arch.config import ArchConfig
from forethought.arch.export import export_engine_folder, token_names
from forethought.arch.models import build_model
from forethought.arch.tasks import build_task
from forethought.cli import main
from forethought.errors import ForethoughtError
from forethought.model.recurrent import RecurrentCache
from forethought.trace import Patch, act_name, run_with_trace
from forethought.weights import load_model

SHAPE = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64)


def lab_model(arch: str, vocab: int = 16, seed: int = 0, **shape):
    """A freshly initialised lab model, its weights scaled up so that layers matter (a random init at 0.02
    leaves every layer's contribution near zero)."""
    model = build_model(ArchConfig(arch, vocab, **(SHAPE | shape)), seed=seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "layer_logits" not in name:
                p.mul_(6.0)
            if "layer_logits" in name:
                p.copy_(torch.linspace(-1.0, 1.0, p.numel()))  # unequal layer weights, so the order matters
    return model


def reference_feedback(net, tokens: torch.Tensor) -> torch.Tensor:
    """Fan et al.'s Feedback Transformer, written out from the equations with plain tensor ops: for each token,
    every layer attends over [memories of earlier tokens; its own input], both through the one shared K/V map;
    the memory is the softmax(w)-weighted sum of the embedding and every layer's output."""
    c = net.config
    H, hd = c.n_heads, c.head_dim
    W = {name: p.detach().double() for name, p in net.named_parameters()}

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * w

    def rope(x, pos):  # x [H, hd]
        if not c.use_rope:
            return x
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.cat((pos * inv, pos * inv))
        half = hd // 2
        rotated = torch.cat((-x[:, half:], x[:, :half]), dim=-1)
        return x * torch.cos(ang) + rotated * torch.sin(ang)

    kv = W["memory.kv.weight_t"]  # [d, 2 H hd]
    mix = torch.softmax(W["memory.layer_logits"], 0)
    out = []
    for seq in tokens:
        mem_k, mem_v, logits = [], [], []
        for pos, token in enumerate(seq.tolist()):
            h = W["embed"][token]
            states = [h]
            for i in range(c.n_layers):
                p = f"blocks.{i}."
                a = rms(h, W[p + "attn_norm.weight"])
                q = rope((a @ W[p + "q.weight_t"]).view(H, hd), pos)
                k_own, v_own = (a @ kv).split(H * hd)
                keys = torch.stack(mem_k + [rope(k_own.view(H, hd), pos)], dim=1)  # [H, n, hd]
                values = torch.stack(mem_v + [v_own.view(H, hd)], dim=1)
                weights = torch.softmax((keys @ q[:, :, None])[..., 0] / math.sqrt(hd), dim=-1)  # [H, n]
                attended = (weights[:, :, None] * values).sum(1).reshape(H * hd)
                h = h + attended @ W[p + "o.weight_t"]
                m = rms(h, W[p + "mlp_norm.weight"]) @ W[p + "gate_up.weight_t"]
                gate, up = m.split(c.d_ff)
                h = h + (F.silu(gate) * up) @ W[p + "down.weight_t"]
                states.append(h)
            memory = sum(w * s for w, s in zip(mix, states))
            k_mem, v_mem = (rms(memory, W["memory.norm.weight"]) @ kv).split(H * hd)
            mem_k.append(rope(k_mem.view(H, hd), pos))
            mem_v.append(v_mem.view(H, hd))
            logits.append(rms(h, W["final_norm.weight"]) @ W["unembed.weight_t"])
        out.append(torch.stack(logits))
    return torch.stack(out)


@pytest.mark.parametrize("positions", ["rope", "none"])
def test_feedback_engine_matches_the_equations(positions):
    model = lab_model("feedback", seed=1, positions=positions)
    tokens = torch.randint(0, 16, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens).double()
    expected = reference_feedback(model.net, tokens)
    assert float(expected.std()) > 0.5  # the weights are large enough for a wrong mixing to show
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_recurrent_engine_matches_torch_multilayer_gru():
    model = lab_model("recurrent", seed=2, n_layers=3)
    net = model.net
    reference = torch.nn.GRU(32, 32, num_layers=3, batch_first=True)
    with torch.no_grad():
        for i, block in enumerate(net.blocks):
            for leaf in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(reference, f"{leaf}_l{i}").copy_(getattr(block.gru, f"{leaf}_l0"))
        tokens = torch.randint(0, 16, (2, 20), generator=torch.Generator().manual_seed(1))
        states, _ = reference(F.embedding(tokens, net.embed))
        _, trace = run_with_trace(net, tokens, [act_name(2, "resid_post")])
    torch.testing.assert_close(trace[act_name(2, "resid_post")], states, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["feedback", "recurrent"])
def test_model_folder_round_trip_and_trace_names(arch, tmp_path):
    task = build_task("recall")
    model = lab_model(arch, vocab=task.vocab_size, seed=3)
    export_engine_folder(model, task, tmp_path / arch)
    lm = load_model(str(tmp_path / arch))
    assert lm.config.family == arch
    ids = lm.tokenizer.encode("k3 v1 k0 v7 k3")
    assert ids == [3, 9, 0, 15, 3]
    with torch.no_grad():
        torch.testing.assert_close(lm.model(torch.tensor([ids]))[..., : task.vocab_size], model(torch.tensor([ids])))
    if arch == "feedback":
        _, trace = run_with_trace(lm.model, [ids], ["memory", "attn_pattern"])
        assert trace["memory"].shape == (5, 32)
        pattern = trace[act_name(1, "attn_pattern")]  # [head, query, key]: query t reads keys 0..t
        assert torch.allclose(pattern.sum(-1), torch.ones(4, 5)) and torch.all(pattern.triu(1) == 0)
        with pytest.raises(ForethoughtError, match="no bidirectional form"):
            lm.model(torch.tensor([ids]), causal=False)
    else:
        with pytest.raises(ForethoughtError, match="no activation matches 'attn_pattern'.*recurrent"):
            run_with_trace(lm.model, [ids], ["attn_pattern"])
        assert lm.config.kv_bytes(1) == lm.config.kv_bytes(1000) == 2 * 32 * 4


@pytest.mark.parametrize("arch", ["feedback", "recurrent", "standard"])
def test_token_by_token_capture_and_patch_equal_a_step_by_step_run(arch):
    """A whole pass with an "add" patch at position p equals decoding token by token with the patch applied at
    step p only; the captured activations agree too. Checks the hook adapter of the sequential families (the
    standard family, hooked once per pass, is the control that the comparison itself is right)."""
    model = lab_model(arch, seed=4).net
    tokens = torch.randint(0, 16, (1, 9), generator=torch.Generator().manual_seed(2))[0].tolist()
    name = act_name(0, "resid_post")
    nudge = torch.randn(32, generator=torch.Generator().manual_seed(3))
    patch = Patch(name, nudge, positions=[4], mode="add")
    whole_logits, whole = run_with_trace(model, [tokens], [name], patches=[patch])
    cache = model.new_cache(16)
    steps, captured = [], []
    for t, token in enumerate(tokens):
        patches = [Patch(name, nudge, positions=[t], mode="add")] if t == 4 else []
        logits, tr = run_with_trace(model, [[token]], [name], cache=cache, patches=patches)
        steps.append(logits[0, 0])
        captured.append(tr[name][0])
    torch.testing.assert_close(whole_logits[0], torch.stack(steps), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole[name], torch.stack(captured), rtol=1e-4, atol=1e-5)
    unpatched = run_with_trace(model, [tokens])[0][0]
    assert (whole_logits[0, 4] - unpatched[4]).abs().max() > 1e-3  # the patch did something
    torch.testing.assert_close(whole_logits[0, :4], unpatched[:4])  # and nothing before its position


@pytest.mark.parametrize("arch, reaches_later", [("feedback", True), ("standard", False)])
def test_top_layer_of_the_past_reaches_later_tokens_only_with_feedback(arch, reaches_later):
    """The thread's "pyramidal flow": in a standard decoder nothing reads a token's top-layer output except its
    own unembedding, so changing it at position p leaves every later position's logits exactly as they were;
    in the Feedback Transformer later tokens read it through the memory."""
    model = lab_model(arch, seed=5).net
    tokens = torch.randint(0, 16, (1, 8), generator=torch.Generator().manual_seed(4))
    top = act_name(model.config.n_layers - 1, "resid_post")
    base = run_with_trace(model, tokens)[0][0]
    patched = run_with_trace(model, tokens, patches=[Patch(top, torch.full((32,), 3.0), positions=[3], mode="add")])
    later = (patched[0][0, 4:] - base[4:]).abs().max()
    assert (later > 1e-3) if reaches_later else (later == 0)


def test_recurrent_cache_rewinds_and_reports_a_fixed_state():
    net = lab_model("recurrent", seed=6).net
    tokens = torch.randint(0, 16, (1, 10), generator=torch.Generator().manual_seed(5))
    cache = net.new_cache(4)
    with torch.no_grad():
        net(tokens, cache=cache)
        assert cache.length == 10 and cache.nbytes == 2 * 32 * 4  # grown past the first capacity; fixed state
        branch = cache.copy()
        branch.truncate(6)
        rewound = net(tokens[:, 6:7], cache=branch)[0, -1]
        fresh = net(tokens[:, :7])[0, -1]
    torch.testing.assert_close(rewound, fresh, rtol=1e-5, atol=1e-6)
    lean = RecurrentCache(net.config, history=False)
    with torch.no_grad():
        net(tokens, cache=lean)
    assert lean.nbytes == cache.nbytes and lean.allocated_nbytes == lean.nbytes < cache.allocated_nbytes
    with pytest.raises(ValueError, match="cannot rewind"):
        lean.truncate(3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Trained-for-a-few-steps feedback and GRU models written by `forethought arch train`, plus a corpus of
    their symbols (random sequences over 16 names: no held-out document is a near-copy of a training one)."""
    root = tmp_path_factory.mktemp("lab")
    out = {}
    for arch in ("feedback", "recurrent"):
        args = ["arch", "train", "--arch", arch, "--task", "recall", "--steps", "3", "--batch", "4", "--d-model", "16"]
        assert main([*args, "--heads", "2", "--d-ff", "32", "--out", str(root / arch), "--json"]) == 0
        out[arch] = root / arch / "engine"
    names = token_names(build_task("recall"))
    generator = torch.Generator().manual_seed(0)
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(120):
            picks = torch.randint(0, len(names), (48,), generator=generator).tolist()
            f.write(json.dumps({"text": " ".join(names[i] for i in picks)}) + "\n")
    out["corpus"] = root / "corpus.jsonl"
    return out


@pytest.mark.parametrize("arch", ["feedback", "recurrent"])
def test_lens_extract_and_probe_commands_run_on_a_trained_lab_model(arch, folders, capsys, tmp_path):
    folder = str(folders[arch])
    capsys.readouterr()
    assert main(["lens", "k1 v2 k3 v4", "--model", folder, "-n", "2", "--json"]) == 0
    lens = json.loads(capsys.readouterr().out)
    assert len(lens["layers"]) == 2
    store = tmp_path / "store"
    extract = ["extract", "--out", str(store), "--corpus", str(folders["corpus"]), "--model", folder]
    assert main([*extract, "--tokens", "5000", "--window", "48", "--json"]) == 0
    capsys.readouterr()
    # From another working directory: the store names the model folder by its absolute path.
    assert main(["probe", "--store", str(store), "--offsets", "1-2", "--eval-tokens", "256", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["offsets"] == [1, 2]


@pytest.mark.parametrize("arch", ["feedback", "recurrent"])
def test_viewer_serves_a_lab_model(arch, folders):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from forethought.server import Limits, create_app

    lm = load_model(str(folders[arch]))
    app = create_app(lm, Limits(max_tokens=64, max_new_tokens=8, max_sessions=2, max_body_bytes=4096))
    with TestClient(app) as client:
        r = client.post("/api/analyze", json={"session": "s", "prompt": "k1 v2 k3 v4 k1", "new_tokens": 3})
        assert r.status_code == 200, r.text
        data = r.json()
        assert len(data["metrics"]["lens"]) == 3 and len(data["tokens"]) == 8
        cell = client.get("/api/cell", params={"session": "s", "row": 2, "position": 6}).json()
    if arch == "feedback":
        heads = torch.tensor(cell["attention"]["heads"])  # over the memories of 0..5 and the token itself
        assert heads.shape == (2, 7) and torch.allclose(heads.sum(-1), torch.ones(2), atol=1e-3)
    else:
        assert cell["attention"] is None and "no attention" in cell["attention_note"]


def test_streamed_text_continues_the_prompt_with_its_separator(tmp_path):
    """`generate` streams token by token; the first new word of a word-level tokenizer needs the space that
    only the prompt's last token decides (before the prompt was given as context it printed "0 1 10 0")."""
    from forethought.weights.tokenizer import StreamDecoder

    task = build_task("parity", 8)
    export_engine_folder(lab_model("feedback", vocab=task.vocab_size), task, tmp_path / "fb")
    tokenizer = load_model(str(tmp_path / "fb")).tokenizer
    prompt, new = tokenizer.encode("0 1 1"), tokenizer.encode("0 1 0")
    with_context = StreamDecoder(tokenizer, context=prompt)
    assert "".join(with_context.push(i) for i in new) == " 0 1 0"
    without = StreamDecoder(tokenizer)
    assert "".join(without.push(i) for i in new) == "0 1 0"  # no prompt: nothing to separate from


def test_no_positional_encoding_is_rope_at_angle_zero():
    """`positions="none"` (NoPE) is the same network with every rotation the identity; the control, the real
    RoPE tables, changes the logits."""
    nope = lab_model("standard", seed=7, positions="none").net
    rope = lab_model("standard", seed=7).net
    tokens = torch.randint(0, 16, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (rope(tokens) - nope(tokens)).abs().max() > 1e-3
        rope.rope_cos.fill_(1.0)
        rope.rope_sin.zero_()
        torch.testing.assert_close(rope(tokens), nope(tokens))


@pytest.mark.parametrize("arch", ["standard", "feedback"])
def test_models_without_positions_round_trip_and_decode_like_recompute(arch, tmp_path):
    """A Llama without RoPE is written as a `forethought_llama` folder (HF would load it with RoPE), and once
    loaded it must not take the compiled decode step, which always rotates: cached decoding equals recompute."""
    task = build_task("recall")
    model = lab_model(arch, vocab=task.vocab_size, seed=8, positions="none")
    export_engine_folder(model, task, tmp_path / arch)
    config = json.loads((tmp_path / arch / "config.json").read_text())
    assert config["model_type"] == f"forethought_{'llama' if arch == 'standard' else 'feedback'}"
    lm = load_model(str(tmp_path / arch))
    assert lm.config.use_rope is False
    ids = lm.tokenizer.encode("k3 v1 k0 v7 k3 v2 k1")
    with torch.no_grad():
        full = lm.model(torch.tensor([ids]))
        torch.testing.assert_close(full[..., : task.vocab_size], model(torch.tensor([ids])))
        cache = lm.model.new_cache(16)
        stepped = torch.cat([lm.model(torch.tensor([[i]]), cache=cache) for i in ids], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-5)
