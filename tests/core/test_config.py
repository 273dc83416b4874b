"""Settings: defaults, precedence (flags > env > file > defaults), and one-line errors."""

import json

import pytest

from dataclasses import fields

from core.config import ROLES, ModelSpec, TrainConfig, load_config, model_fields, settings_table
from core.errors import ConfigError


def test_defaults_are_the_reference_trainers():
    cfg = load_config([], environ={})
    assert (cfg.iterations, cfg.train_batch_tokens, cfg.train_seq_len, cfg.seed) == (20000, 524288, 1024, 1337)
    assert (cfg.matrix_lr, cfg.tied_embed_lr, cfg.warmdown_iters, cfg.max_wallclock_seconds) == (0.04, 0.05, 1200, 600.0)
    assert cfg.model_spec() == ModelSpec()


def test_every_model_setting_has_a_role_and_is_a_run_setting_with_the_same_default_and_help():
    spec_fields = {f.name: f for f in fields(ModelSpec)}
    run_fields = {f.name: f for f in fields(TrainConfig)}
    assert list(spec_fields) == list(model_fields()) and set(model_fields(*ROLES)) == set(spec_fields)
    for name, f in spec_fields.items():
        assert run_fields[name].default == f.default and run_fields[name].metadata["help"] == f.metadata["help"]
    assert [n for n, f in run_fields.items() if f.metadata["role"] is not None] == list(spec_fields)
    with pytest.raises(ValueError, match="unknown role"):
        model_fields("shape")


def test_flags_over_env_over_file_over_defaults(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"NUM_LAYERS": 3, "model_dim": 64, "SEED": 5, "TIE_EMBEDDINGS": 0}))
    env = {"CONFIG": str(f), "NUM_LAYERS": "4", "SEED": "6"}
    cfg = load_config(["--num-layers", "5"], environ=env)
    assert cfg.num_layers == 5          # flag
    assert cfg.seed == 6                # env over file
    assert cfg.model_dim == 64          # file over default
    assert cfg.tie_embeddings is False  # file, bool from 0
    assert cfg.num_heads == 8           # default


@pytest.mark.parametrize("argv, env, message", [
    ([], {"NUM_LAYERS": "nine"}, "NUM_LAYERS='nine': expected an integer"),
    ([], {"MATRIX_LR": "fast"}, "MATRIX_LR='fast': expected a number"),
    ([], {"TIE_EMBEDDINGS": "maybe"}, "TIE_EMBEDDINGS='maybe': expected 1/0"),
    ([], {"NUM_HEADS": "7"}, "NUM_HEADS=7: must divide model_dim=512"),
    ([], {"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS=3: must divide num_heads=8"),
    ([], {"LOGIT_SOFTCAP": "0"}, "LOGIT_SOFTCAP=0.0: must be a positive number"),
    ([], {"MODEL_DIM": "24", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"}, "head_dim = model_dim/num_heads = 3 must be even"),
    ([], {"DEVICE": "tpu"}, "DEVICE='tpu': must be one of auto, cpu, cuda"),
    ([], {"ITERATIONS": "0"}, "ITERATIONS=0: must be positive"),
    (["--no-such-flag", "1"], {}, "unrecognized arguments: --no-such-flag"),
    ([], {"WARMDOWN_FRAC": "1.5"}, "WARMDOWN_FRAC=1.5: must be in [0, 1]"),
    ([], {"WARMDOWN_FRAC": "-0.1"}, "WARMDOWN_FRAC=-0.1: must be in [0, 1]"),
    ([], {"EMA_DECAY": "1"}, "EMA_DECAY=1.0: must be in [0, 1)"),
    ([], {"EMA_DECAY": "-0.5"}, "EMA_DECAY=-0.5: must be in [0, 1)"),
    ([], {"MUON_WD": "-1"}, "MUON_WD=-1.0: must not be negative"),
    ([], {"VAL_MAX_TOKENS": "-1"}, "VAL_MAX_TOKENS=-1: must not be negative"),
    ([], {"VAL_MAX_TOKENS": "100"}, "VAL_MAX_TOKENS=100: must be 0 (all) or at least TRAIN_SEQ_LEN = 1024"),
    ([], {"MUON_NS_COEFFS": "magic"}, "MUON_NS_COEFFS='magic': must be one of fixed, polar-express"),
    ([], {"PRESET": "record-9"}, "PRESET=record-9: no such preset; known: record-1.0611"),
    ([], {"PRESET": "../pyproject"}, "PRESET=../pyproject: no such preset"),
])
def test_bad_values_are_one_line_errors_naming_setting_and_value(argv, env, message):
    with pytest.raises(ConfigError) as e:
        load_config(argv, environ=env)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config", str(tmp_path / "missing.json")], environ={})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(["--config", str(bad)], environ={})
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"NUM_LAYER": 3}')
    with pytest.raises(ConfigError, match="unknown setting 'NUM_LAYER'"):
        load_config(["--config", str(unknown)], environ={})


def test_every_setting_has_env_flag_and_help():
    rows = settings_table()
    names = {r[0] for r in rows}
    for required in ("DATA_PATH", "TOKENIZER_PATH", "RUN_ID", "WARMUP_STEPS", "VAL_BATCH_SIZE", "VAL_LOSS_EVERY",
                     "TRAIN_LOG_EVERY", "ROPE_BASE", "QK_GAIN_INIT", "EMBED_LR", "HEAD_LR", "MUON_MOMENTUM",
                     "MUON_BACKEND_STEPS", "MUON_MOMENTUM_WARMUP_START", "MUON_MOMENTUM_WARMUP_STEPS", "BETA1",
                     "BETA2", "ADAM_EPS", "GRAD_CLIP_NORM", "NORM_EPS", "DEVICE", "COMPUTE_DTYPE",
                     "GRAD_ACCUM_STEPS", "OUT_DIR"):
        assert required in names
    assert all(flag.startswith("--") and help for _, flag, _, help in rows)


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--help"], environ={}, prog="trainer")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for _, flag, _, _ in settings_table())


def test_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [env for env, flag, _, _ in settings_table() if f"`{env}`" not in readme or f"`{flag}`" not in readme]
    assert not missing, f"README lacks {missing}"


def test_a_preset_sits_under_every_explicit_setting(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"MATRIX_LR": 0.01}))
    cfg = load_config(["--num-layers", "12"], environ={"PRESET": "record-1.0611", "CONFIG": str(f), "EMA_DECAY": "0.5"})
    assert cfg.preset == "record-1.0611"
    assert (cfg.num_layers, cfg.matrix_lr, cfg.ema_decay) == (12, 0.01, 0.5)    # flag, file, env win
    assert (cfg.model_dim, cfg.train_batch_tokens, cfg.train_seq_len, cfg.beta2) == (512, 786432, 2048, 0.99)
    assert (cfg.muon_ns_coeffs, cfg.muon_row_normalize, cfg.warmdown_frac, cfg.min_lr) == ("polar-express", True, 0.85, 0.1)
    assert (cfg.muon_wd, cfg.adam_wd, cfg.embed_wd, cfg.grad_clip_norm) == (0.095, 0.02, 0.085, 0.3)


def test_a_preset_lists_what_it_does_not_apply():
    """Every setting of the preset file is applied or listed: none is dropped in silence."""
    from core.config import preset_of
    from core.presets import PRESET_DIR, SECTIONS

    cfg = load_config([], environ={"PRESET": "record-1.0611"})
    preset = preset_of(cfg)
    data = json.loads((PRESET_DIR / "record-1.0611.json").read_text())
    values = {k: v for section in SECTIONS for k, v in data.get(section, {}).items()}
    other = {k for group in data["other_work"].values() for k in group}
    applied = {k.upper() for k in preset.settings}
    assert applied | set(preset.unsupported) == set(values) | other
    assert not applied & set(preset.unsupported)     # nothing is both applied and listed
    for key in applied:   # as the file says (1/0 read as true/false)
        assert getattr(cfg, key.lower()) == values[key], key
    lines = preset.unsupported_lines()
    assert all(line.startswith("preset record-1.0611: not yet supported, not applied (") for line in lines)
    text = " ".join(lines)
    assert all(f"{key}=" in text for key in preset.unsupported)
    assert "COMPRESSOR" not in text     # the record's pergroup compressor is applied
    assert "CASEOPS_ENABLED=1" in text and "FUSED_CE_ENABLED=1" in text and "GATED_ATTN_ENABLED=0" in text


def test_the_record_preset_applies_its_quantizer_and_test_time_training():
    """What this build has of the record's artifact and evaluation, the preset applies, not lists."""
    from core.config import preset_of

    cfg = load_config([], environ={"PRESET": "record-1.0611"})
    assert (cfg.quant, cfg.gptq, cfg.compressor, cfg.matrix_bits, cfg.embed_bits) == ("gptq", True, "pergroup", 6, 7)
    assert (cfg.lqer_enabled, cfg.lqer_rank, cfg.lqer_top_k, cfg.lqer_asym_enabled) == (True, 4, 3, True)
    assert (cfg.ttt_enabled, cfg.ttt_lora_rank, cfg.ttt_chunk_size, cfg.ttt_eval_seq_len) == (True, 80, 48, 2048)
    assert (cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases, cfg.global_ttt_lr) == (2500, 3, 0.001)
    text = " ".join(preset_of(cfg).unsupported_lines())
    for applied in ("QUANT=", "MATRIX_BITS=", "LQER_RANK=", "TTT_ENABLED=", "TTT_LORA_RANK=", "PHASED_TTT_"):
        assert applied not in text, applied


def test_a_preset_with_an_unknown_section_is_one_line(tmp_path, monkeypatch):
    """A misspelt section would otherwise be ignored in silence."""
    import core.presets

    (tmp_path / "typo.json").write_text(json.dumps({"description": "", "schedul": {"ITERATIONS": 5}}))
    monkeypatch.setattr(core.presets, "PRESET_DIR", tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config([], environ={"PRESET": "typo"})
    assert "PRESET=typo:" in str(e.value) and "unknown sections ['schedul']" in str(e.value)
    assert "\n" not in str(e.value)


def test_an_other_work_setting_a_section_also_sets_is_listed_with_its_substitute(tmp_path, monkeypatch):
    """A preset may use something of its own in place of its source's setting: both are said."""
    import core.config
    import core.presets

    data = {"description": "", "artifact": {"COMPRESSOR": "lzma"}, "other_work": {"a compressor": {"COMPRESSOR": "zstd"}}}
    (tmp_path / "sub.json").write_text(json.dumps(data))
    monkeypatch.setattr(core.presets, "PRESET_DIR", tmp_path)
    cfg = load_config([], environ={"PRESET": "sub"})
    assert cfg.compressor == "lzma"
    assert core.config.preset_of(cfg).unsupported_lines() == [
        "preset sub: not yet supported, not applied (a compressor; the preset sets COMPRESSOR=lzma instead): COMPRESSOR=zstd"]
