"""trainer/tying.py: the direct-path analysis, on real checkpoints of both backends and on a
synthetic Markov chain whose bigram table is known."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from core.config import ModelSpec
from core.init import init_weights
from trainer_helpers import REPO, tiny_env, train
from trainer.tying import analyze_tying, direct_path_figures, format_tying, main

FIGURES = ("symmetry", "direct_path_asymmetry", "data_asymmetry", "direct_path_bits_per_token",
           "unigram_bits_per_token", "bigram_bits_per_token", "direct_path_bpb", "unigram_bpb", "bigram_bpb",
           "tying_params", "tying_params_share", "params_unique", "train_tokens", "val_bigrams", "val_bytes")


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """The same 3-step run, tied in torch and in MLX, and untied in torch: (TrainResult, analysis)."""
    out = {}
    for name, backend, tie in (("torch", "torch", 1), ("mlx", "mlx", 1), ("untied", "torch", 0)):
        tmp = tmp_path_factory.mktemp(name)
        result = train(backend, tiny_env(tiny_dataset, tmp, ITERATIONS=3, RUN_ID="r", TIE_EMBEDDINGS=tie))
        out[name] = (result, analyze_tying(result.checkpoint))
    return out


def test_a_tied_checkpoint_is_symmetric_and_an_untied_one_is_not(runs):
    from core.checkpoint import load_checkpoint

    tied, untied = runs["torch"][1], runs["untied"][1]
    assert tied["tied"] and not untied["tied"]
    assert tied["symmetry"] < 1e-6
    head = load_checkpoint(runs["untied"][0].checkpoint).weights["lm_head.weight"]
    assert np.abs(head).max() > 0  # lm_head starts at zeros: the steps have moved it
    assert untied["symmetry"] > 1e-2
    # the trainers' own unigram baseline is the same model on the same bigrams
    for result, analysis in runs.values():
        assert analysis["unigram_bits_per_token"] == pytest.approx(
            result.summary["unigram_val_loss"] / math.log(2), rel=1e-9)
        assert analysis["unigram_bpb"] == pytest.approx(result.summary["unigram_val_bpb"], rel=1e-9)
        assert analysis["bigram_bits_per_token"] < analysis["unigram_bits_per_token"]
        assert analysis["step"] == 3 and analysis["run_id"] == "r"


def test_torch_and_mlx_checkpoints_of_the_same_run_give_the_same_numbers(runs):
    a, b = runs["torch"][1], runs["mlx"][1]
    assert a["backend"] == "torch" and b["backend"] == "mlx"
    for key in FIGURES:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
    # zlib's byte counts of weights that differ in their last float bits: equal within a few bytes
    for key in ("artifact_bytes", "tying_artifact_bytes"):
        assert b[key] == pytest.approx(a[key], rel=1e-3), key


def test_tying_costs_are_the_head_matrix(runs):
    from core.artifact import pack
    from core.checkpoint import load_checkpoint

    for name in ("torch", "untied"):
        result, r = runs[name]
        ckpt = load_checkpoint(result.checkpoint)
        V, d = ckpt.spec.vocab_size, ckpt.spec.model_dim
        assert r["tying_params"] == V * d
        assert r["params_saved_by_tying"] == (V * d if r["tied"] else 0)
        assert r["tying_params_share"] == pytest.approx(V * d / r["params_unique"])
        assert r["artifact_bytes"] == len(pack(ckpt.weights)) == result.artifact_bytes
        head = "tok_emb.weight" if r["tied"] else "lm_head.weight"
        rest = {k: v for k, v in ckpt.weights.items() if k != head}
        assert r["tying_artifact_bytes"] == r["artifact_bytes"] - len(pack(rest)) > 0
        assert r["tying_artifact_bytes_exact"] == (not r["tied"])


# ---------------------------------------------------------------------------------------------
# A Markov chain with a known, asymmetric transition table
# ---------------------------------------------------------------------------------------------

V = 8


def markov_chain(T: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(seed))
    cdf = np.cumsum(T, axis=1)
    u = rng.random(n)
    out = np.empty(n, dtype=np.int64)
    state = 0
    for t in range(n):
        state = min(int(np.searchsorted(cdf[state], u[t] * cdf[state, -1], side="right")), V - 1)
        out[t] = state
    return out


def stationary(T: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eig(T.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    return pi / pi.sum()


def entropy_rate_bits(T: np.ndarray) -> float:
    return float(-(stationary(T)[:, None] * T * np.log2(T)).sum())


def centred_asymmetry(M: np.ndarray) -> float:
    """The hand computation: J·M·J with the explicit centring matrix J, then ‖L − Lᵀ‖_F / ‖L‖_F."""
    J = np.eye(M.shape[0]) - np.ones(M.shape) / M.shape[0]
    L = J @ M @ J
    return float(np.sqrt(((L - L.T) ** 2).sum() / (L ** 2).sum()))


def direct_path_of(T: np.ndarray):
    """An untied one-layer model whose direct path is log T: W_E = √d·I makes rmsnorm(rmsnorm(W_E[i]))
    = √d·e_i (up to eps), W_U = (log T)ᵀ/√d makes raw[i, j] = log T[i, j], and a softcap of 10⁴
    leaves it as it is (tanh's error ~ (raw/c)²/3 ~ 1e-7)."""
    spec = ModelSpec(vocab_size=V, num_layers=1, model_dim=V, num_heads=1, num_kv_heads=1,
                     tie_embeddings=False, logit_softcap=1e4)
    weights = init_weights(spec, 0)
    weights["tok_emb.weight"] = (np.sqrt(V) * np.eye(V)).astype(np.float32)
    weights["lm_head.weight"] = (np.log(T).T / np.sqrt(V)).astype(np.float32)
    return spec, weights


@pytest.fixture(scope="module")
def chain():
    rng = np.random.Generator(np.random.PCG64(3))
    T = rng.dirichlet(np.full(V, 0.7), size=V) + 0.01   # strictly positive, far from symmetric
    T /= T.sum(axis=1, keepdims=True)
    return T, markov_chain(T, 120_000, seed=1), markov_chain(T, 40_000, seed=2)


def test_the_figures_recover_a_known_asymmetric_bigram_table(chain):
    T, train_tokens, val = chain
    spec, weights = direct_path_of(T)
    # train tokens in two pieces: a pair spans the boundary, as the training stream reads shards
    r = direct_path_figures(spec, weights, [train_tokens[:50_000], train_tokens[50_000:]], val, costs=False)
    x, y = val[:-1], val[1:]
    H = entropy_rate_bits(T)

    # the direct path is log T: its cross-entropy is T's own on the val bigrams, close to the entropy rate
    assert r["direct_path_bits_per_token"] == pytest.approx(-np.log2(T[x, y]).mean(), rel=1e-5)
    assert r["direct_path_bits_per_token"] == pytest.approx(H, abs=0.03)
    assert r["symmetry"] == pytest.approx(np.linalg.norm(np.log(T) - np.log(T).T) / np.linalg.norm(np.log(T)),
                                          rel=1e-5)
    assert r["direct_path_asymmetry"] == pytest.approx(centred_asymmetry(np.log(T)), rel=1e-4)

    # hand counts of the train bigrams and unigrams, add-one smoothed
    C = np.zeros((V, V))
    np.add.at(C, (train_tokens[:-1], train_tokens[1:]), 1)
    n = np.bincount(train_tokens, minlength=V)
    M = np.log((C + 1) / (C.sum(axis=1, keepdims=True) + V))
    assert r["train_tokens"] == train_tokens.size and r["val_bigrams"] == y.size
    assert r["bigram_bits_per_token"] == pytest.approx(-M[x, y].mean() / math.log(2), rel=1e-12)
    assert r["bigram_bits_per_token"] == pytest.approx(H, abs=0.03)
    assert r["unigram_bits_per_token"] == pytest.approx(-np.log2((n[y] + 1) / (n.sum() + V)).mean(), rel=1e-12)
    assert r["unigram_bits_per_token"] > H + 0.2
    assert r["data_asymmetry"] == pytest.approx(centred_asymmetry(M), rel=1e-12)
    assert r["data_asymmetry"] > 0.3
    assert r["data_asymmetry"] == pytest.approx(centred_asymmetry(np.log(T)), abs=0.03)  # the chain's own


def test_symmetric_bigram_counts_have_no_data_asymmetry(chain):
    """A stream followed by itself reversed has symmetric bigram counts C (the reversed half counts
    Cᵀ, the junction pair is on the diagonal): log p(j | i) is then asymmetric only through its
    per-row normalisation, which the centring removes; the uncentred measure would not."""
    T, tokens, val = chain
    stream = np.concatenate([tokens, tokens[::-1]])
    spec, weights = direct_path_of(T)
    r = direct_path_figures(spec, weights, stream, val, costs=False)
    assert r["data_asymmetry"] < 1e-12
    C = np.zeros((V, V))
    np.add.at(C, (stream[:-1], stream[1:]), 1)
    assert np.array_equal(C, C.T)
    M = np.log((C + 1) / (C.sum(axis=1, keepdims=True) + V))
    assert np.linalg.norm(M - M.T) / np.linalg.norm(M) > 0.05   # what the centring takes away


def test_a_tied_model_with_random_weights_is_symmetric():
    from core.init import random_weights

    spec = ModelSpec(vocab_size=V, num_layers=1, model_dim=8, num_heads=1, num_kv_heads=1)
    tokens = np.arange(1000) % V
    r = direct_path_figures(spec, random_weights(spec, 0), tokens, tokens, costs=False)
    assert r["symmetry"] < 1e-12 and r["tied"]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def test_the_command_writes_tying_json_beside_the_checkpoints(runs, tmp_path, capsys):
    result, analysis = runs["torch"]
    got = main(["--checkpoint", str(result.checkpoint)], environ={})
    written = json.loads((result.run_dir / "tying.json").read_text())
    assert written == json.loads(json.dumps(got)) and got == analysis
    printed = capsys.readouterr().out
    assert printed.splitlines()[:-1] == format_tying(got) and "tying.json" in printed
    # the environment gives the checkpoint and OUT; a flag wins over the environment
    out = tmp_path / "sub" / "t.json"
    main([], environ={"CHECKPOINT": str(result.checkpoint), "OUT": str(out), "MAX_TRAIN_TOKENS": "1"})
    assert json.loads(out.read_text())["max_train_tokens"] == 1  # still whole shards: one
    main(["--out", str(tmp_path / "flag.json")], environ={"CHECKPOINT": str(result.checkpoint),
                                                          "OUT": str(tmp_path / "env.json")})
    assert (tmp_path / "flag.json").is_file() and not (tmp_path / "env.json").exists()


@pytest.mark.parametrize("args, says", [
    (["--checkpoint", "no/such.safetensors"], "no such file"),
    (["--checkpoint", "x.safetensors", "--max-train-tokens", "0"], "MAX_TRAIN_TOKENS=0"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(args, says, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer.tying", *args], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and says in proc.stderr


def test_data_path_and_tokenizer_path_override_the_checkpoints(runs, tiny_dataset, tmp_path, capsys):
    result, analysis = runs["torch"]
    data_path, tokenizer = tiny_dataset
    same = main([], environ={"CHECKPOINT": str(result.checkpoint), "DATA_PATH": data_path,
                             "TOKENIZER_PATH": tokenizer, "OUT": str(tmp_path / "t.json")})
    assert same == analysis
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(result.checkpoint), "--data-path", str(tmp_path / "nope")], environ={})
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "DATA_PATH" in err


@pytest.mark.parametrize("tie", [True, False])
def test_the_direct_path_is_the_models_forward_with_every_block_silent_under_a_real_softcap(tie):
    """P[i] is the float64 reference's logits of the one-token input i when every block adds nothing
    (init: zero output projections, residual mix (1, 0); no skip), with a softcap the raw logits
    exceed many times over, and an RMSNorm epsilon that shows."""
    from core import reference
    from trainer.tying import direct_path_logits
    spec = ModelSpec(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, logit_softcap=3.0,
                     norm_eps=0.05, tie_embeddings=tie)
    rng = np.random.default_rng(4)
    weights = init_weights(spec, seed=4)
    weights["tok_emb.weight"] = rng.standard_normal((64, 32)).astype(np.float32) * 0.3
    if not tie:
        weights["lm_head.weight"] = rng.standard_normal((64, 32)).astype(np.float32) * 0.3
    weights["skip_weights"] = np.zeros_like(weights["skip_weights"])
    expected = reference.logits(spec, weights, np.arange(64)[:, None])[:, 0, :]
    assert np.abs(expected).max() > 0.9 * spec.logit_softcap   # saturated: the softcap shapes P
    np.testing.assert_allclose(direct_path_logits(spec, weights), expected, rtol=1e-12, atol=1e-12)
