"""make pg-export (interop/export.py, interop/pg_export.py): train_gpt.py's state dict from a checkpoint,
and make pg-import's checkpoint as a starting point of our trainers."""

import numpy as np
import pytest
import torch
from torch import nn

import parity_lib
from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import ModelSpec, TrainConfig
from core.params import is_control
from core.reference import cross_entropy
from data.datasets import resolve_dataset
from data.stream import load_validation_tokens
from interop import pg_export, pg_import
from interop.conventions import MLX_SCRIPT_EPS, TORCH_SCRIPT_EPS
from pg_fixtures import script_weights, write_torch_state_dict
from trainer_helpers import TINY, tiny_env, train

SPEC = ModelSpec(vocab_size=256, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, norm_eps=TORCH_SCRIPT_EPS)
IDS = np.random.default_rng(0).integers(0, SPEC.vocab_size, size=(2, 24))


class ScriptGPT(nn.Module):
    """train_gpt.py's module tree (names, shapes, dtypes; no forward): what load_state_dict checks."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, kv, hidden = spec.model_dim, spec.kv_dim, spec.hidden_dim
        self.tok_emb = nn.Embedding(spec.vocab_size, d)
        self.skip_weights = nn.Parameter(torch.ones(spec.num_skip_weights, d))
        self.blocks = nn.ModuleList()
        for _ in range(spec.num_layers):
            block = nn.Module()
            block.attn = nn.Module()
            for name, rows in (("c_q", d), ("c_k", kv), ("c_v", kv), ("proj", d)):
                setattr(block.attn, name, nn.Linear(d, rows, bias=False))
            block.attn.q_gain = nn.Parameter(torch.ones(spec.num_heads))
            block.mlp = nn.Module()
            block.mlp.fc, block.mlp.proj = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)
            block.attn_scale, block.mlp_scale = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
            block.resid_mix = nn.Parameter(torch.ones(2, d))
            self.blocks.append(block)
        self.lm_head = None if spec.tie_embeddings else nn.Linear(d, spec.vocab_size, bias=False)
        # The script's dtypes: everything bfloat16, then linear layers and control/low-dim parameters float32.
        self.bfloat16()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.float()
        for name, p in self.named_parameters():
            if p.ndim < 2 or is_control(name):
                p.data = p.data.float()


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("tied", [True, False])
def test_import_then_export_gives_back_the_same_tensors_byte_for_byte(tmp_path, tied):
    spec = ModelSpec(**{**SPEC.to_dict(), "tie_embeddings": tied})
    src, ckpt, out = tmp_path / "final_model.pt", tmp_path / "imported.safetensors", tmp_path / "exported.pt"
    write_torch_state_dict(src, script_weights(spec, 1))
    pg_import.main([], environ={"SRC": str(src), "OUT": str(ckpt)})
    lines = pg_export.main([], environ={"CHECKPOINT": str(ckpt), "OUT": str(out)})
    assert not any(line.startswith("warning") for line in lines)   # the epsilon is train_gpt.py's
    before, after = torch.load(src, weights_only=True), torch.load(out, weights_only=True)
    assert sorted(before) == sorted(after)
    for name in before:
        assert after[name].dtype == before[name].dtype, name
        assert tensor_bytes(after[name]) == tensor_bytes(before[name]), name
    script = ScriptGPT(spec)
    script.load_state_dict(after, strict=True)
    assert {n: t.dtype for n, t in script.state_dict().items()} == {n: t.dtype for n, t in after.items()}


def test_the_exported_model_computes_our_logits_in_train_gpt_py(tmp_path):
    """Our checkpoint (+θ) exported, run through train_gpt.py's forward (-θ, its epsilon), gives our logits."""
    weights = script_weights(SPEC, 2)   # tok_emb already bfloat16-valued: the export rounds nothing
    ckpt, out = tmp_path / "ours.safetensors", tmp_path / "final_model.pt"
    save_checkpoint(ckpt, spec=SPEC, config=TrainConfig(**SPEC.to_dict()), step=5, weights=weights,
                    optimizer_state={}, data_state={})
    lines = pg_export.main([], environ={"CHECKPOINT": str(ckpt), "OUT": str(out)})
    assert len(lines) == 1   # no warning, nothing rounded
    exported = {n: t.float().numpy() for n, t in torch.load(out, weights_only=True).items()}
    theirs = parity_lib.variant_logits(SPEC, exported, IDS, rope_sign=-1.0, eps=TORCH_SCRIPT_EPS)
    for backend in ("torch", "mlx"):
        assert parity_lib.rel(parity_lib.logits(backend, SPEC, weights, IDS), theirs) <= 1e-5, backend
    assert parity_lib.rel(parity_lib.variant_logits(SPEC, exported, IDS, eps=TORCH_SCRIPT_EPS), theirs) > 1e-3


def test_export_warns_in_one_line_with_the_size_of_the_epsilon_difference(tiny_dataset, tmp_path, capsys):
    data_path, tokenizer = tiny_dataset
    spec = ModelSpec(vocab_size=512, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, norm_eps=MLX_SCRIPT_EPS)
    ckpt, out = tmp_path / "ours.safetensors", tmp_path / "final_model.pt"
    weights = script_weights(spec, 3)
    save_checkpoint(ckpt, spec=spec, config=TrainConfig(**spec.to_dict(), data_path=data_path, tokenizer_path=tokenizer,
                                                        train_seq_len=32),
                    step=0, weights=weights, optimizer_state={}, data_state={})
    pg_export.main([], environ={"CHECKPOINT": str(ckpt), "OUT": str(out), "EPS_CHECK_SEQS": "2"})
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and warning.startswith(f"warning: {ckpt} has norm_eps=1e-06")
    assert "Δval_loss" in warning and "max |Δlogit|" in warning and "first 64 validation tokens" in warning
    # The figure is train_gpt.py's epsilon minus ours, in mean nats over the first 2 x 32 val tokens.
    tokens = load_validation_tokens(resolve_dataset(data_path, tokenizer, 512).val_files, 32).astype(np.int64)
    ids, targets = tokens[:64].reshape(2, 32), tokens[1:65].reshape(2, 32)
    expected = (cross_entropy(parity_lib.variant_logits(spec, weights, ids, eps=TORCH_SCRIPT_EPS), targets).mean()
                - cross_entropy(parity_lib.variant_logits(spec, weights, ids), targets).mean())
    delta = float(warning.split("Δval_loss ")[1].split()[0])
    assert delta == pytest.approx(expected, rel=5e-3) and abs(expected) > 1e-6 and out.exists()   # 3 digits printed
    pg_export.main([], environ={"CHECKPOINT": str(ckpt), "OUT": str(out), "DATA_PATH": str(tmp_path / "none")})
    assert "not measured" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_an_imported_checkpoint_trains_on_from_its_weights(backend, tiny_dataset, tmp_path):
    """RESUME_FROM a weights-only checkpoint: step 0, fresh optimizer, the data from its start."""
    spec = ModelSpec(**{k.lower(): int(TINY[k]) for k in ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS",
                                                           "NUM_KV_HEADS")})
    src, ckpt = tmp_path / "final_model.pt", tmp_path / "imported.safetensors"
    write_torch_state_dict(src, script_weights(spec, 4))
    pg_import.main([], environ={"SRC": str(src), "OUT": str(ckpt)})
    assert load_checkpoint(ckpt).spec.norm_eps == TORCH_SCRIPT_EPS
    result = train(backend, tiny_env(tiny_dataset, tmp_path, RESUME_FROM=ckpt, NORM_EPS=TORCH_SCRIPT_EPS, ITERATIONS=2))
    assert result.step == 2 and len(result.train_losses) == 2
    log = (result.run_dir / "log.txt").read_text()
    assert f"resumed from {ckpt} at step:0 (trained by pg-import torch-state-dict)" in log
