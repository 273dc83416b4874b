"""The mutants of `make mutants` (bench/mutants.py): one line each, and the tests that should kill it.

Each is an exact (file, original line, replacement); indentation is kept from the file. `within`
names the block to search when the same line occurs twice in a file. A mutant no test can kill
carries `equivalent`: why it computes the same thing. Chosen in code that both backends share (the
parity suite cannot see a bug there), in both models and optimizers, and in the run loop.
"""

from bench.mutants import Mutant

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
    Mutant("core-20", "core/memory.py",
           "return -(-(micro_batch_tokens // seq_len) // per_chunk)",
           "return (micro_batch_tokens // seq_len) // per_chunk", MEMORY),
    Mutant("core-21", "core/memory.py",
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
           "return self.proj(mx.square(nn.relu(self.fc(x))))",
           "return self.proj(nn.relu(self.fc(x)))", MLX_MODEL),
    Mutant("mlx-2", "backend_mlx/model.py",
           "x = x + self.skip_weights[j] * skips.pop()",
           "x = x + self.skip_weights[j] * skips.pop(0)", MLX_MODEL),
    Mutant("mlx-3", "backend_mlx/model.py",
           "return c * mx.tanh(raw.astype(mx.float32) / c)",
           "return c * mx.tanh(raw.astype(mx.float32))", MLX_MODEL),
    Mutant("mlx-4", "backend_mlx/model.py",
           "x = mix[0] * x + mix[1] * x0                                        # fp32 residual stream",
           "x = mix[0] * x + mix[0] * x0", MLX_MODEL),
    Mutant("mlx-5", "backend_mlx/model.py",
           "mask = mx.where(mx.arange(keys)[None, :] <= position[:, None], 0.0, -mx.inf).astype(q.dtype)",
           "mask = mx.where(mx.arange(keys)[None, :] < position[:, None], 0.0, -mx.inf).astype(q.dtype)", MLX_MODEL),
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
           "return self.proj(torch.relu(self.fc(x)).square())",
           "return self.proj(torch.relu(self.fc(x)))", TORCH_MODEL),
    Mutant("torch-2", "backend_torch/model.py",
           "x = x + self.skip_weights[j] * skips.pop()",
           "x = x + self.skip_weights[j] * skips.pop(0)", TORCH_MODEL),
    Mutant("torch-3", "backend_torch/model.py",
           "return c * torch.tanh(raw.float() / c)",
           "return raw.float()", TORCH_MODEL),
    Mutant("torch-4", "backend_torch/model.py",
           "x = x + self.mlp_scale * self.mlp(rms_norm(x, self.eps)).float()",
           "x = self.mlp_scale * self.mlp(rms_norm(x, self.eps)).float()", TORCH_MODEL),
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
    # trainer/run_folder.py and trainer/tracking.py: REPORT_TO
    Mutant("trainer-1", "trainer/run_folder.py",
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
]
