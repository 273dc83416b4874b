"""The mutants of `make mutants` (commands/mutants.py): one line each, and the tests that should kill it.

Each is an exact (file, original line, replacement); indentation is kept from the file. `within`
names the block to search when the same line occurs twice in a file. A mutant no test can kill
carries `equivalent`: why it computes the same thing. Chosen in code that both backends share (the
parity suite cannot see a bug there), in both models and optimizers, and in the run loop.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    """One line of one file replaced by a plausible bug, and the tests that should fail because of it."""
    id: str
    path: str                 # relative to the repo
    original: str             # the whole line, without its indentation
    replacement: str          # the new line, without its indentation (the original's is kept)
    tests: tuple[str, ...]    # test files (or test ids) to run
    equivalent: str = ""      # why no test can kill it, when that is so
    within: str = ""          # a line (e.g. "def f(") that opens the block to search, when the
                              # original line also occurs elsewhere in the file


SCHEDULE = ("tests/core/test_schedule.py",)
METRICS = ("tests/core/test_metrics.py", "tests/independent/test_validation_independent.py")
ARTIFACT = ("tests/core/test_artifact.py", "tests/independent/test_artifact_independent.py")
INIT = ("tests/core/test_init.py",)
CHECKPOINT = ("tests/core/test_checkpoint.py",)
MEMORY = ("tests/core/test_memory.py",)
SHARDS = ("tests/data/test_shards.py",)
STREAM = ("tests/data/test_stream.py",)
TOKENIZER = ("tests/data/test_tokenizer.py",)
MLX_MODEL = ("tests/mlx/test_mlx_model.py",)
MLX_OPTIM = ("tests/mlx/test_mlx_optim.py", "tests/independent/test_adam_steps.py")
TORCH_MODEL = ("tests/torch/test_torch_model.py",)
TORCH_OPTIM = ("tests/torch/test_torch_optim.py", "tests/independent/test_adam_steps.py")
EVAL_WINDOWS = ("tests/data/test_eval_windows.py",)
WARMUP = ("tests/trainer/test_loop_paths.py::test_warmup_with_compile_on_leaves_every_step_loss_unchanged[mlx]",)
RESUME = ("tests/test_trainers.py::test_resume_reproduces_the_uninterrupted_losses_exactly[mlx]",)
CLOCK = ("tests/test_trainers.py::test_resume_continues_the_training_clock_of_the_checkpoint",)
TRACKING = ("tests/trainer/test_tracking.py",)
CAP = ("tests/trainer/test_loop_paths.py::test_the_wallclock_cap_stops_an_mlx_run_warming_down_by_time",)
REFERENCE_FILES = ("tests/interop/test_reference_files.py", "tests/interop/test_bad_files.py")
RECORD_ATTENTION = ("tests/parity/test_parity_record_attention.py",)
PG_IMPORT = ("tests/interop/test_make_targets.py::test_make_pg_import_keeps_the_source_runs_softcap_and_rope_base",)
RING = ("tests/mlx/test_mlx_ring.py",)
DDP_ACCUM = ("tests/torch/test_torch_train.py::test_two_ranks_with_gloo_and_two_accumulation_steps_match_one_rank_with_four",)
VALIDATION = ("tests/independent/test_validation_independent.py", "tests/trainer/test_sliding_eval.py")
OTHER_SETTINGS = ("tests/independent/test_validation_independent.py::"
                  "test_make_eval_of_an_artifact_from_a_run_with_other_settings_matches_the_reference",)
EVAL_FILE_TESTS = "tests/trainer/test_eval_file.py::"
EVAL_ARTIFACT = (EVAL_FILE_TESTS + "test_an_artifact_is_scored_as_the_checkpoint_of_its_weights",)
EVAL_OVERRIDE = (EVAL_FILE_TESTS + "test_a_setting_given_beats_the_files_run",)
EVAL_BAD_INPUT = (EVAL_FILE_TESTS + "test_bad_inputs_are_one_line_errors_with_exit_status_2",)
EVAL_CHECKPOINT = (EVAL_FILE_TESTS + "test_a_checkpoint_gives_the_same_figures_in_both_backends_and_writes_only_out",)
EVAL_REFERENCE = ("tests/interop/test_eval_reference_files.py::test_eval_of_a_reference_artifact_equals_eval_of_its_import[torch-int8]",)
TYING = tuple(f"tests/trainer/test_tying.py::{t}" for t in (
    "test_the_direct_path_is_the_models_forward_with_every_block_silent_under_a_real_softcap",
    "test_the_figures_recover_a_known_asymmetric_bigram_table", "test_symmetric_bigram_counts_have_no_data_asymmetry"))
FILES = ("tests/core/test_files.py",)
DIVERGENCE = ("tests/trainer/test_divergence.py::test_a_nan_loss_between_log_steps_stops_the_run_before_its_checkpoint[mlx]",
              "tests/trainer/test_divergence.py::test_nan_weights_after_a_finite_loss_are_never_saved[checkpoint-mlx]")
MEASURED = "tests/core/test_memory_measured.py::"
MEMORY_BAND = (MEASURED + "test_the_estimate_is_within_the_band_of_the_measured_peak[mlx lazy]",)
EAGER_BOUND = (MEASURED + "test_mlx_eager_eval_bounds_the_step_to_one_chunk",)
PLAN_FIT = ("tests/trainer/test_plan.py::test_a_run_that_cannot_fit_is_one_line_before_anything_is_written[mlx]",)
PLAN_BUDGET = ("tests/trainer/test_plan.py::test_the_auto_budget_is_the_documented_share_of_the_machine",)
PLAN_AUTO = ("tests/trainer/test_plan.py::test_auto_micro_steps_fit_the_budget_and_train_as_the_same_value_written_out[mlx]",)
SPEC_TOLERANCES = ("tests/parity/test_spec_tolerances.py",)
TTT_PLAN = ("tests/data/test_ttt_plan.py",)
TTT = ("tests/trainer/test_ttt.py::test_documents_shorter_than_a_chunk_leave_legal_ttt_nothing_to_learn_from",
       "tests/trainer/test_ttt.py::test_an_adapter_that_keeps_what_it_learned_across_documents_is_caught",
       "tests/trainer/test_ttt.py::test_the_adapters_adamw_is_torchs_adamw_in_both_backends",
       "tests/trainer/test_ttt.py::test_torch_and_mlx_give_the_same_ttt_figures_with_adapters_and_global_phases")

MUTANTS = [
    # core/schedule.py: the learning-rate and momentum schedules
    Mutant("core-1", "core/schedule.py",
           "by_steps = max((iterations - step) / warmdown_iters, 0.0)",
           "by_steps = max((iterations - step - 1) / warmdown_iters, 0.0)", SCHEDULE),
    Mutant("core-2", "core/schedule.py",
           "if max(iterations - warmdown_iters, 0) <= step:",
           "if max(iterations - warmdown_iters, 0) < step:", SCHEDULE),
    Mutant("core-3", "core/schedule.py",
           "return (1 - frac) * start + frac * end",
           "return frac * start + (1 - frac) * end", SCHEDULE),
    Mutant("core-4", "core/schedule.py",
           "return min(by_steps, by_time)",
           "return by_time", SCHEDULE),
    Mutant("core-5", "core/schedule.py",
           "return 1000.0 * cfg.max_wallclock_seconds if cfg.max_wallclock_seconds > 0 else None",
           "return 100.0 * cfg.max_wallclock_seconds if cfg.max_wallclock_seconds > 0 else None", SCHEDULE),
    # core/metrics.py: bits per byte
    Mutant("core-6", "core/metrics.py",
           "space = tables.has_leading_space[y] & ~tables.is_boundary[x]",
           "space = tables.has_leading_space[y] & ~tables.is_boundary[y]", METRICS),
    Mutant("core-7", "core/metrics.py",
           'base_bytes[i] = len(piece.replace(SPACE, " ").encode("utf-8"))',
           'base_bytes[i] = len(piece.encode("utf-8"))', METRICS),
    Mutant("core-8", "core/metrics.py",
           "return (self.loss_sum / math.log(2)) / self.bytes",
           "return (self.loss_sum / math.log(2)) / self.tokens", METRICS),
    Mutant("core-9", "core/metrics.py",
           "counts = np.asarray(train_counts, dtype=np.float64) + 1.0",
           "counts = np.asarray(train_counts, dtype=np.float64)", METRICS),
    # core/artifact.py: the int8 quantizer and its format
    Mutant("core-10", "core/artifact.py",
           "q = np.clip(np.rint(np.clip(w, -clip, clip) / scale), -127, 127).astype(_I8)",
           "q = np.clip(np.floor(np.clip(w, -clip, clip) / scale), -127, 127).astype(_I8)", ARTIFACT,
           within="def _quantize_rows("),
    Mutant("core-11", "core/artifact.py",
           "q = np.clip(np.rint(np.clip(w, -clip, clip) / scale), -127, 127).astype(_I8)",
           "q = np.clip(np.rint(np.clip(w, -clip, clip) / scale), -63, 63).astype(_I8)", ARTIFACT,
           within="def _quantize_rows("),
    Mutant("core-12", "core/artifact.py",
           "scale = np.maximum(clip / np.float32(127.0), np.float32(1.0 / 127.0))",
           "scale = clip / np.float32(127.0)", ARTIFACT),
    Mutant("core-13", "core/artifact.py",
           "CLIP_Q = np.float32(99.99984 / 100.0)   # float32, as torch.quantile converts q to the input's dtype",
           "CLIP_Q = np.float32(99.9984 / 100.0)", ARTIFACT),
    Mutant("core-14", "core/artifact.py",
           'parts = {"data": w32.astype(_F32 if scheme == "fp32" else _F16)}',
           'parts = {"data": w32.astype(_F16)}', ARTIFACT),
    Mutant("core-15", "core/artifact.py",
           "if w.size > KEEP_FLOAT_MAX_NUMEL:",
           "if w.size >= KEEP_FLOAT_MAX_NUMEL:", ARTIFACT),
    Mutant("core-16", "core/artifact.py",
           "scale = np.float32(clip / 127.0 if clip > 0 else 1.0)",
           "scale = np.float32(clip / 128.0 if clip > 0 else 1.0)", ARTIFACT),
    # core/init.py: the initial weights both backends load
    Mutant("core-17", "core/init.py",
           "bound = 1.0 / np.sqrt(p.shape[1])  # shape is (out, in)",
           "bound = 1.0 / np.sqrt(p.shape[0])", INIT),
    Mutant("core-18", "core/init.py",
           "w = np.stack([np.ones(p.shape[1]), np.zeros(p.shape[1])])",
           "w = np.stack([np.zeros(p.shape[1]), np.ones(p.shape[1])])", INIT),
    # core/checkpoint.py and core/memory.py
    Mutant("core-19", "core/checkpoint.py",
           "tensors.update(optim_arrays)",
           "tensors.update({})", CHECKPOINT),
    Mutant("core-20", "core/memory_plan.py",
           "return -(-(micro_batch_tokens // seq_len) // per_chunk)",
           "return (micro_batch_tokens // seq_len) // per_chunk", MEMORY),
    Mutant("core-21", "core/memory_kept.py",
           "state += 4 * p.numel * (1 if p.group == MATRIX else 2)",
           "state += 4 * p.numel * (2 if p.group == MATRIX else 1)", MEMORY),
    # data/shards.py: the shard format
    Mutant("data-1", "data/shards.py",
           "if size != HEADER_BYTES + 2 * n:",
           "if size != HEADER_BYTES + n:", SHARDS),
    Mutant("data-2", "data/shards.py",
           "if tokens.size == 0 or int(tokens.max()) < vocab_size:",
           "if tokens.size == 0 or int(tokens.max()) <= vocab_size:", SHARDS),
    Mutant("data-3", "data/shards.py",
           "header[0], header[1], header[2] = MAGIC, VERSION, tokens.size",
           "header[0], header[1], header[2] = MAGIC, VERSION, tokens.size - 1", SHARDS),
    # data/stream.py: the training and validation token order
    Mutant("data-4", "data/stream.py",
           "self._load((self.file_index + 1) % len(self.files))",
           "self._load(0)", STREAM),
    Mutant("data-5", "data/stream.py",
           "local = chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64)",
           "local = chunk[:span].astype(np.int64)", STREAM),
    Mutant("data-6", "data/stream.py",
           "usable = ((tokens.size - 1) // seq_len) * seq_len if tokens.size else 0",
           "usable = (tokens.size // seq_len) * seq_len if tokens.size else 0", STREAM),
    Mutant("data-7", "data/stream.py",
           "return range(count * rank // world_size, count * (rank + 1) // world_size)",
           "return range(count * rank // world_size, count * (rank + 1) // world_size - 1)", STREAM),
    Mutant("data-8", "data/stream.py",
           "if seen >= max_tokens:",
           "if seen > max_tokens:", STREAM),
    # data/tokenizer.py
    Mutant("data-9", "data/tokenizer.py",
           "parts.append(np.array([BOS_ID] + ids, dtype=np.uint16))",
           "parts.append(np.array(ids, dtype=np.uint16))", TOKENIZER),
    # backend_mlx/model.py
    Mutant("mlx-1", "backend_mlx/model.py",
           "return self.proj(mx.square(h))",
           "return self.proj(h)", MLX_MODEL),
    Mutant("mlx-2", "backend_mlx/model.py",
           "x = self.add_skip(x, skips.pop(), j)",
           "x = self.add_skip(x, skips.pop(0), j)", MLX_MODEL),
    Mutant("mlx-3", "backend_mlx/model.py",
           "return c * mx.tanh(raw.astype(mx.float32) / c)",
           "return c * mx.tanh(raw.astype(mx.float32))", MLX_MODEL),
    Mutant("mlx-4", "backend_mlx/model.py",
           "x = mix[0] * x + mix[1] * x0                                        # fp32 residual stream",
           "x = mix[0] * x + mix[0] * x0", MLX_MODEL),
    Mutant("mlx-5", "backend_mlx/model.py",
           "seen = mx.arange(keys)[None, :] <= position[:, None]",
           "seen = mx.arange(keys)[None, :] < position[:, None]", MLX_MODEL),
    Mutant("mlx-6", "backend_mlx/model.py",
           "return mx.fast.rms_norm(x.astype(mx.float32), None, eps)",
           "return mx.fast.rms_norm(x.astype(mx.float32), None, 1.1920929e-07)", MLX_MODEL),
    # backend_mlx/optim.py
    Mutant("mlx-7", "core/optimizer.py",
           "return 1 - beta1 ** t, 1 - beta2 ** t",
           "return 1 - beta1 ** (t + 1), 1 - beta2 ** (t + 1)", MLX_OPTIM + TORCH_OPTIM),
    Mutant("mlx-8", "backend_mlx/optim.py",
           "updates = [g + momentum * buf for g, buf in zip(grads, bufs)]   # Nesterov",
           "updates = bufs", MLX_OPTIM),
    Mutant("mlx-9", "core/optimizer.py",
           "return max(1.0, rows / cols) ** 0.5",
           "return max(1.0, cols / rows) ** 0.5", MLX_OPTIM + TORCH_OPTIM),
    Mutant("mlx-10", "backend_mlx/optim.py",
           "scale = mx.minimum(max_norm / (total + CLIP_EPS), 1.0)",
           "scale = mx.maximum(max_norm / (total + CLIP_EPS), 1.0)", MLX_OPTIM),
    Mutant("mlx-11", "backend_mlx/optim.py",
           "new_params.append(p - lr * m_hat / (mx.sqrt(v_hat) + eps))",
           "new_params.append(p - lr * m_hat / mx.sqrt(v_hat + eps))", MLX_OPTIM),
    # backend_torch/model.py
    Mutant("torch-1", "backend_torch/model.py",
           "return self.proj(h.square())",
           "return self.proj(h)", TORCH_MODEL),
    Mutant("torch-2", "backend_torch/model.py",
           "x = self.add_skip(x, skips.pop(), j)",
           "x = self.add_skip(x, skips.pop(0), j)", TORCH_MODEL),
    Mutant("torch-3", "backend_torch/model.py",
           "return c * torch.tanh(raw.float() / c)",
           "return raw.float()", TORCH_MODEL),
    Mutant("torch-4", "backend_torch/model.py",
           "x = x + self.mlp_scale * self.mlp(self.norm(x)).float()",
           "x = self.mlp_scale * self.mlp(self.norm(x)).float()", TORCH_MODEL),
    Mutant("torch-5", "backend_torch/model.py",
           "return F.rms_norm(x.float(), (x.size(-1),), eps=eps)",
           "return F.rms_norm(x.float(), (x.size(-1),))", TORCH_MODEL),
    # trainer/loop.py: resuming, warmup, the wall-clock cap
    Mutant("loop-1", "trainer/loop.py",
           "loader.restore(ckpt.data_state)",
           "pass", RESUME),
    Mutant("loop-2", "trainer/loop.py",
           "backend.load_optimizer_state(ckpt.optimizer_state)",
           "pass", RESUME),
    Mutant("loop-3", "trainer/loop.py",
           "backend.load_optimizer_state(optim0)",
           "pass", WARMUP),
    Mutant("loop-4", "trainer/loop.py",
           "loader.restore(data0)",
           "pass", WARMUP),
    Mutant("loop-5", "trainer/loop.py",
           "self.stop_after = self.step",
           "self.stop_after = self.step + 1", CAP),
    Mutant("loop-6", "trainer/loop.py",
           'return ckpt.step, float(ckpt.extra.get("train_time_ms", 0.0))',
           "return ckpt.step, 0.0", RESUME + CLOCK),
    # trainer/reporters.py and trainer/tracking.py: REPORT_TO
    Mutant("trainer-1", "trainer/reporters.py",
           "tracker.record(record)",
           "pass", TRACKING),
    Mutant("trainer-2", "trainer/tracking.py",
           'if name not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)',
           'if name not in ("kind", "step", "tokens") and isinstance(value, (int, float)) and not isinstance(value, bool)',
           TRACKING),
    Mutant("trainer-3", "trainer/tracking.py",
           "self.run.log(scalars(record), step=int(record[\"step\"]))",
           "self.run.log(scalars(record))", TRACKING),
    # backend_torch/optim.py: the multi-tensor Adam and the stacked Muon
    Mutant("torch-6", "backend_torch/optim.py",
           "denom = torch._foreach_div(vs, bias_correction2)          # v_hat",
           "denom = torch._foreach_div(vs, bias_correction1)          # v_hat", TORCH_OPTIM),
    Mutant("torch-7", "backend_torch/optim.py",
           "updates = torch._foreach_add(grads, bufs, alpha=momentum)   # Nesterov: g + momentum * buf",
           "updates = torch._foreach_add(grads, bufs, alpha=1.0)", TORCH_OPTIM),
    Mutant("torch-8", "core/optimizer.py",
           "NS_COEFFS = (3.4445, -4.7750, 2.0315)",
           "NS_COEFFS = (3.4445, -4.7750, 2.3015)", TORCH_OPTIM + MLX_OPTIM),
    # data/eval_windows.py: the sliding-window plan (every target scored once)
    Mutant("data-10", "data/eval_windows.py",
           "first[1:] = L - (starts[1:] - starts[:-1])           # the window before ended at starts[k-1] + L",
           "first[1:] = L - (starts[1:] - starts[:-1]) + 1", EVAL_WINDOWS),
    Mutant("data-11", "data/eval_windows.py",
           "starts = np.minimum(np.arange(count, dtype=np.int64) * stride, last)",
           "starts = np.minimum(np.arange(count - 1, dtype=np.int64) * stride, last)", EVAL_WINDOWS),
    # interop/: the reference trainers' files (RoPE flip, epsilons, dequantizing, the safe unpickler)
    Mutant("interop-1", "interop/conventions.py",
           "for proj, heads in ((\"c_q\", spec.num_heads), (\"c_k\", spec.num_kv_heads)):",
           "for proj, heads in ((\"c_q\", spec.num_heads),):", REFERENCE_FILES),
    Mutant("interop-2", "interop/conventions.py",
           "sign[r // 2:r] = -1.0", "sign[r // 2 + 1:r] = -1.0", REFERENCE_FILES),
    Mutant("interop-3", "interop/conventions.py",
           "TORCH_SCRIPT_EPS = float(np.finfo(np.float32).eps)   # 1.1920928955078125e-07",
           "TORCH_SCRIPT_EPS = 1e-6", REFERENCE_FILES),
    Mutant("interop-4", "interop/conventions.py",
           "MLX_SCRIPT_EPS = 1e-6", "MLX_SCRIPT_EPS = 1e-5", REFERENCE_FILES),
    Mutant("interop-5", "interop/conventions.py",
           "bare = bare.split(\".\", 1)[1]", "bare = bare[1:]", REFERENCE_FILES),
    Mutant("interop-6", "interop/reference_files.py",
           "if kind in TORCH_KINDS:", "if kind == TORCH_STATE_DICT:", REFERENCE_FILES),
    Mutant("interop-7", "interop/reference_files.py",
           "weights[name] = _as_dtype(w, dtype)", "weights[name] = w", REFERENCE_FILES),
    Mutant("interop-8", "interop/reference_files.py",
           "weights[name] = _as_dtype(to_float32(t, name, source), orig_dtypes.get(name, \"float32\"))",
           "weights[name] = to_float32(t, name, source)", REFERENCE_FILES),
    Mutant("interop-9", "interop/reference_files.py",
           "if head[:1] == b\"\\x80\":   # pickle's PROTO opcode, the first byte of every protocol >= 2 pickle",
           "if head[:1] == b\"\\x81\":", REFERENCE_FILES),
    Mutant("interop-10", "interop/reference_files.py",
           "spec = infer_spec(weights, source=source, **{\"norm_eps\": eps, **settings})",
           "spec = infer_spec(weights, source=source, **settings)", REFERENCE_FILES),
    Mutant("interop-11", "interop/safe_pickle.py",
           "if target is None:", "if target is None and module.startswith(\"numpy\"):", REFERENCE_FILES),
    Mutant("interop-12", "interop/safe_pickle.py",
           "if not isinstance(text, str) or encoding not in (\"latin1\", \"latin-1\"):",
           "if not isinstance(text, str):", REFERENCE_FILES),
    Mutant("interop-13", "interop/safe_pickle.py",
           "elif isinstance(value, (list, tuple)):", "elif isinstance(value, list):", REFERENCE_FILES),
    Mutant("interop-14", "interop/safe_pickle.py",
           "for v in value.values():", "for v in value:", REFERENCE_FILES),
    Mutant("interop-15", "interop/pg_import.py",
           "model_settings.update(logit_softcap=settings.logit_softcap, rope_base=settings.rope_base)",
           "model_settings.update(logit_softcap=settings.logit_softcap)", PG_IMPORT),
    Mutant("interop-16", "interop/bfloat16.py",
           "rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16",
           "rounded = (u + np.uint32(0x7FFF)) >> 16", ("tests/interop/test_bfloat16.py",)),
    # distributed: averaging across ranks (MLX's ring, torch's DDP) and the replica check's digest
    Mutant("dist-1", "backend_mlx/distributed.py",
           "shared = {k: v for k, v in settings.items() if k not in PER_HOST_SETTINGS}",
           "shared = dict(settings)", RING),
    Mutant("dist-2", "backend_mlx/distributed.py",
           "if settings.get(\"resume_from\"):", "if False:", RING),
    Mutant("dist-3", "backend_mlx/distributed.py",
           "PER_HOST_SETTINGS = {\"data_path\", \"tokenizer_path\", \"out_dir\", \"run_id\", \"resume_from\", \"device\", \"compile\",",
           "PER_HOST_SETTINGS = {\"seed\", \"data_path\", \"tokenizer_path\", \"out_dir\", \"run_id\", \"resume_from\", \"device\", \"compile\",",
           RING),
    Mutant("dist-4", "backend_mlx/distributed.py",
           "if highest != digest or -negated_lowest != digest:", "if highest != digest:", RING),
    Mutant("dist-5", "backend_mlx/distributed.py",
           "reduce = mx.distributed.all_sum if op == \"sum\" else mx.distributed.all_max",
           "reduce = mx.distributed.all_max if op == \"sum\" else mx.distributed.all_sum", RING),
    Mutant("dist-6", "backend_mlx/session.py",
           "grads = self.ring.average_gradients(grads)",
           "grads = {k: self.ring.all_sum(g) for k, g in grads.items()}", RING),
    Mutant("dist-7", "backend_mlx/session.py",
           "loss = self.ring.all_sum(loss) / self.world_size", "loss = self.ring.all_sum(loss)", RING),
    Mutant("dist-8", "backend_torch/session.py",
           "sync = self.world_size == 1 or i == n - 1", "sync = self.world_size == 1 or i == 0", DDP_ACCUM),
    Mutant("dist-9", "backend_torch/session.py",
           "return mean_loss if summed is None else summed[0] / self.world_size",
           "return mean_loss if summed is None else summed[0]", DDP_ACCUM),
    # trainer/validation.py: val_loss and val_bpb over the whole set, standard and sliding
    Mutant("val-1", "trainer/validation.py", "tokens += y.size", "tokens += y.size - 1", VALIDATION),
    Mutant("val-2", "trainer/validation.py",
           "n_bytes += float(token_bytes(tables, x, y).sum())", "n_bytes += float(token_bytes(tables, y, x).sum())",
           VALIDATION),
    Mutant("val-3", "trainer/validation.py",
           "loss_sum, tokens, n_bytes = backend.all_reduce_sum([loss_sum, tokens, n_bytes])",
           "loss_sum, n_bytes, tokens = backend.all_reduce_sum([loss_sum, tokens, n_bytes])", VALIDATION),
    Mutant("val-4", "trainer/validation.py",
           "tokens += float(scored.sum())", "tokens += float(scored.size)", VALIDATION),
    Mutant("val-5", "trainer/validation.py",
           "loss_sum += float(backend.eval_token_losses(x, y)[scored].sum())",
           "loss_sum += float(backend.eval_token_losses(x, y).sum())", VALIDATION),
    Mutant("val-6", "trainer/validation.py",
           "n_bytes += float(token_bytes(tables, x, y)[scored].sum())",
           "n_bytes += float(token_bytes(tables, x, y).sum())", VALIDATION),
    # trainer/eval_file.py and trainer/model_files.py: make eval of a file, with its run's settings
    Mutant("eval-1", "trainer/eval_file.py",
           "INHERITED = (\"data_path\", \"tokenizer_path\", \"train_seq_len\", \"val_batch_size\", *NOT_IN_SHAPES)",
           "INHERITED = (\"data_path\", \"tokenizer_path\", \"val_batch_size\", *NOT_IN_SHAPES)", EVAL_OVERRIDE),
    Mutant("eval-2", "trainer/eval_file.py",
           "INHERITED = (\"data_path\", \"tokenizer_path\", \"train_seq_len\", \"val_batch_size\", *NOT_IN_SHAPES)",
           "INHERITED = (\"data_path\", \"tokenizer_path\", \"train_seq_len\", \"val_batch_size\")",
           OTHER_SETTINGS),
    Mutant("eval-3", "trainer/eval_file.py",
           "cfg = load_config(rest, environ={**inherited, **environ}, prog=prog)",
           "cfg = load_config(rest, environ={**environ, **inherited}, prog=prog)", EVAL_OVERRIDE),
    Mutant("eval-4", "trainer/eval_file.py",
           "if bool(settings.checkpoint) == bool(settings.artifact):",
           "if not settings.checkpoint and not settings.artifact:", EVAL_BAD_INPUT),
    Mutant("eval-5", "trainer/eval_file.py",
           "\"eval_stride\": cfg.eval_stride, \"eval_seq_len\": seq_len, \"targets\": int(len(val_tokens) - 1),",
           "\"eval_stride\": cfg.eval_stride, \"eval_seq_len\": seq_len, \"targets\": int(len(val_tokens)),", EVAL_CHECKPOINT),
    Mutant("files-model-1", "core/config.py",   # rope_base read from the shapes: an artifact's spec no longer takes it
           "rope_base: float = setting(10000.0, \"RoPE base frequency\", role=UNSHAPED)",
           "rope_base: float = setting(10000.0, \"RoPE base frequency\", role=SHAPES)", OTHER_SETTINGS),
    Mutant("files-model-2", "core/config.py",   # logit_softcap read from the shapes: an artifact's spec no longer takes it
           "logit_softcap: float = setting(30.0, \"logits = c*tanh(raw/c)\", role=UNSHAPED)",
           "logit_softcap: float = setting(30.0, \"logits = c*tanh(raw/c)\", role=SHAPES)", OTHER_SETTINGS),
    Mutant("files-model-3", "core/config.py",   # norm_eps read from the shapes: an artifact's spec no longer takes it
           "norm_eps: float = setting(1e-6, \"RMSNorm epsilon (both backends and the reference)\", role=UNSHAPED)",
           "norm_eps: float = setting(1e-6, \"RMSNorm epsilon (both backends and the reference)\", role=SHAPES)", OTHER_SETTINGS),
    Mutant("files-model-4", "trainer/model_files.py",
           "if 2 <= n < 100_000_000 and head[8:9] == b\"{\":", "if 2 <= n < 100_000_000 and head[8:9] == b\"[\":",
           EVAL_BAD_INPUT),
    Mutant("files-model-5", "trainer/model_files.py",
           "model = read_reference_file(path, **{k: settings.spec_value(k) for k in NOT_IN_SHAPES if k != \"norm_eps\"})",
           "model = read_reference_file(path, **{k: settings.spec_value(k) for k in NOT_IN_SHAPES})", EVAL_REFERENCE),
    Mutant("files-model-6", "trainer/model_files.py",
           "elif kind == \"artifact\" and (path.parent / \"config.json\").is_file():",
           "elif kind == \"artifact\" and (path.parent.parent / \"config.json\").is_file():", EVAL_ARTIFACT),
    # trainer/tying.py: the direct-path analysis
    Mutant("tying-1", "trainer/tying.py",
           "return c * np.tanh(raw / c)            # §4 step 5", "return raw", TYING),
    Mutant("tying-2", "trainer/tying.py",
           "h = rmsnorm(x, spec.norm_eps)          # §4 step 4, the final norm", "h = x", TYING),
    Mutant("tying-3", "trainer/tying.py",
           "name = \"tok_emb.weight\" if spec.tie_embeddings else \"lm_head.weight\"", "name = \"tok_emb.weight\"", TYING),
    Mutant("tying-4", "trainer/tying.py",
           "return m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True) + m.mean()",
           "return m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True)", TYING),
    Mutant("tying-5", "trainer/tying.py",
           "c = np.asarray(bigram_counts, dtype=np.float64) + 1.0",
           "c = np.asarray(bigram_counts, dtype=np.float64) + 0.5", TYING),
    Mutant("tying-6", "trainer/tying.py",
           "bigram[last * V + int(tokens[0])] += 1", "pass", TYING),
    Mutant("tying-7", "trainer/tying.py",
           "log_p_unigram = np.log((unigram + 1.0) / (unigram.sum() + V))",
           "log_p_unigram = np.log((unigram + 1.0) / unigram.sum())", TYING),
    Mutant("tying-8", "trainer/tying.py",
           "return float(-np.sum(log_probs_of_targets, dtype=np.float64) / log_probs_of_targets.size / LN2)",
           "return float(-np.sum(log_probs_of_targets, dtype=np.float64) / log_probs_of_targets.size)", TYING),
    # data/ttt_plan.py, trainer/ttt.py, backend_*/ttt.py: score-first test-time training
    Mutant("ttt-1", "data/ttt_plan.py", "end = starts[i + 1] + 1 if i + 1 < len(starts) else len(tokens)",
           "end = starts[i + 1] if i + 1 < len(starts) else len(tokens)", TTT_PLAN),
    Mutant("ttt-2", "data/ttt_plan.py", "window_start = max(0, end - window)", "window_start = max(0, first - window)",
           TTT_PLAN),
    Mutant("ttt-3", "trainer/ttt.py", "seen[later] |= self.scored[idx[later] - 1]", "seen[later] = True", TTT),
    Mutant("ttt-4", "trainer/ttt.py", "return 1.0 - lr * cfg.ttt_weight_decay, lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t)",
           "return 1.0 - lr * cfg.ttt_weight_decay, lr / (1.0 - b1 ** t), 1.0", TTT),
    Mutant("ttt-5", "backend_mlx/ttt.py", "self.t = 0", "pass", TTT),
    # core/files.py: files written whole or not at all
    Mutant("files-1", "core/files.py",
           "os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary data files", "os.chmod(tmp, 0o600)", FILES),
    Mutant("files-2", "core/files.py",
           "os.fsync(f.fileno())  # the bytes are on disk before the name points at them", "pass", FILES),
    Mutant("files-3", "core/files.py", "os.unlink(tmp)", "pass", FILES),
    Mutant("files-4", "core/files.py", "path.parent.mkdir(parents=True, exist_ok=True)", "pass", FILES),
    Mutant("files-5", "core/files.py",
           "while piece := f.read(chunk_bytes):", "if piece := f.read(chunk_bytes):", FILES),
    Mutant("files-6", "core/files.py",
           "fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f\".{path.name}.\", suffix=\".tmp\")",
           "fd, tmp = tempfile.mkstemp(prefix=f\".{path.name}.\", suffix=\".tmp\")", FILES),
    # trainer/loop.py: the divergence stop (a non-finite loss or weights never reach a checkpoint)
    Mutant("loop-7", "trainer/loop.py", "if not np.isfinite(w).all():", "if np.isinf(w).any():", DIVERGENCE),
    Mutant("loop-8", "trainer/loop.py",
           "self.read_losses()   # a non-finite loss stops the run before its weights are written", "pass", DIVERGENCE),
    Mutant("loop-9", "trainer/loop.py", "if not math.isfinite(loss):", "if math.isinf(loss):", DIVERGENCE),
    Mutant("loop-10", "trainer/loop.py",
           "first = self.step - len(self.unread_losses) + 1", "first = self.step - len(self.unread_losses)", DIVERGENCE),
    # core/memory_estimate.py's magnitudes against measured peaks, and MLX's eager evaluation
    Mutant("memory-1", "core/memory_estimate.py",
           "acts = calls * (_kept_per_layer(backend, c, N, spec, P32, fused, compiled) + probs",
           "acts = (_kept_per_layer(backend, c, N, spec, P32, fused, compiled) + probs", MEMORY_BAND),
    Mutant("memory-2", "core/memory_estimate.py",
           "acts, logits = acts + a, logits + lg", "acts, logits = max(acts, a), max(logits, lg)", MEMORY_BAND),
    Mutant("memory-3", "core/memory_estimate.py", "if mlx and not mlx_eager_eval:", "if mlx:", EAGER_BOUND),
    Mutant("memory-4", "backend_mlx/session.py", "if self.eager_eval:", "if False:", EAGER_BOUND),
    # trainer/plan.py: the budget and the resolved run
    Mutant("plan-1", "trainer/plan.py", "if not m.fits:", "if False:", PLAN_FIT),
    Mutant("plan-2", "trainer/plan.py",
           "return int(cfg.memory_budget_gb * GIB), f\"MEMORY_BUDGET_GB={cfg.memory_budget_gb:g}\"",
           "return int(cfg.memory_budget_gb * 1e9), f\"MEMORY_BUDGET_GB={cfg.memory_budget_gb:g}\"", PLAN_BUDGET),
    Mutant("plan-3", "trainer/plan.py", "kind = BUDGET_DEVICE[backend.device_kind]", "kind = \"cuda\"", PLAN_BUDGET),
    Mutant("plan-4", "trainer/plan.py",
           "resolved = cfg.replace(grad_accum_steps=plan.grad_accum_steps, mlx_eager_eval=plan.mlx_eager_eval,",
           "resolved = cfg.replace(grad_accum_steps=1, mlx_eager_eval=plan.mlx_eager_eval,", PLAN_AUTO),
    # commands/doctor.py: make doctor's tolerances are docs/spec.md §10's
    Mutant("doctor-1", "commands/doctor.py",
           "TOLERANCES = {\"logits\": 1e-5, \"grads\": 1e-4, \"optim_step\": 1e-5}",
           "TOLERANCES = {\"logits\": 1e-2, \"grads\": 1e-4, \"optim_step\": 1e-5}", SPEC_TOLERANCES),
    Mutant("doctor-2", "commands/doctor.py",
           "TOLERANCES = {\"logits\": 1e-5, \"grads\": 1e-4, \"optim_step\": 1e-5}",
           "TOLERANCES = {\"logits\": 1e-5, \"grads\": 1e-1, \"optim_step\": 1e-5}", SPEC_TOLERANCES),
    Mutant("doctor-3", "commands/doctor.py",
           "TOLERANCES = {\"logits\": 1e-5, \"grads\": 1e-4, \"optim_step\": 1e-5}",
           "TOLERANCES = {\"logits\": 1e-5, \"grads\": 1e-4, \"optim_step\": 1e-2}", SPEC_TOLERANCES),
    # bench/launches.py: the counter the lean-step tests rely on counts every host read and collective
    Mutant("bench-1", "bench/launches.py", "self.counts[name] += 1", "self.counts[name] += 0",
           ("tests/torch/test_torch_lean_step.py",)),
    # The record's attention options (docs/spec.md §4.1-§4.5), one in each layer of their realisation
    Mutant("record-attn-1", "backend_torch/model.py",
           "return e + (ids != BOS_ID)[..., None] * g * previous", "return e + g * previous", RECORD_ATTENTION),
    Mutant("record-attn-2", "backend_mlx/model.py",
           "seen = (seen & (docs[:, S - T + start:S - T + stop, None] == docs[:, None, :keys]))[:, None]",
           "seen = seen[None, None]", RECORD_ATTENTION),
    Mutant("record-attn-3", "backend_torch/model.py",
           "unit = F.normalize(v.float(), dim=-1)[:, :, None]                       # v / max(|v|, 1e-12)",
           "unit = v.float()[:, :, None]", RECORD_ATTENTION),
    Mutant("record-attn-4", "core/reference.py",
           "g = 1.0 / (1.0 + np.exp(-spec.sparse_attn_gate_scale * (x[..., :spec.gate_window] @ w[prefix + \"attn_gate_w\"].T)))",
           "g = 1.0 / (1.0 + np.exp(-(x[..., :spec.gate_window] @ w[prefix + \"attn_gate_w\"].T)))", RECORD_ATTENTION),
    Mutant("record-attn-5", "core/config.py",
           "return self.rope_base * (n / L) ** (r / (r - 2))", "return self.rope_base * (n / L) ** (r / (r - 1))",
           ("tests/core/test_record_attention_options.py",)),
]
