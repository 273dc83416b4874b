"""FLOP accounting against hand-computed values and an independent count from the parameter table."""

from core.config import ModelSpec
from core.flops import attention_flops_per_token, flops_per_token, forward_flops_per_token, matmul_params
from core.params import MATRIX, param_table

TINY = ModelSpec(vocab_size=8, num_layers=2, model_dim=4, num_heads=2, num_kv_heads=1, mlp_mult=2)


def test_tiny_spec_by_hand():
    # d=4, hd=2, kv=2, F=8. Per layer: c_q 16 + c_k 8 + c_v 8 + proj 16 + fc 32 + proj 32 = 112.
    # Two layers 224, plus the (tied) head 8*4 = 32.
    assert matmul_params(TINY) == 256
    # T=3: positions 0,1,2 read 1,2,3 keys; each key costs 2d (q.k) + 2d (weights.v) = 16 FLOPs.
    # Per layer: 16 * (1+2+3) / 3 tokens = 32; two layers: 64.
    assert attention_flops_per_token(TINY, 3) == 64
    assert forward_flops_per_token(TINY, 3) == 2 * 256 + 64 == 576
    assert flops_per_token(TINY, 3) == 3 * 576 == 1728


def test_attention_matches_a_position_by_position_count():
    spec = ModelSpec(vocab_size=16, num_layers=3, model_dim=12, num_heads=3, num_kv_heads=1)
    for T in (1, 2, 7, 64):
        total = sum(spec.num_layers * 4 * spec.model_dim * (t + 1) for t in range(T))  # whole window
        assert attention_flops_per_token(spec, T) * T == total


def test_matmul_params_agree_with_the_parameter_table():
    for tied in (True, False):
        spec = ModelSpec(tie_embeddings=tied)
        table = param_table(spec)
        blocks = sum(p.numel for p in table if p.group == MATRIX)
        head = spec.vocab_size * spec.model_dim  # tok_emb.weight or lm_head.weight: used once as the head
        assert matmul_params(spec) == blocks + head == 9 * 1_835_008 + 524_288


def test_default_spec_at_1024_tokens():
    spec = ModelSpec()
    assert forward_flops_per_token(spec, 1024) == 2 * 17_039_360 + 2 * 9 * 512 * 1025
    assert flops_per_token(spec, 1024) == 130_575_360
    assert isinstance(flops_per_token(spec, 1024), int)


def test_the_mfu_ceiling_on_a_big_gpu_is_measured_on_products_big_enough_to_fill_it():
    """An H100 stood in: bf16 products timed from Python reach ~15% of its peak at 1024^2 and level off
    from 4096^2. A run at 400 TFLOP/s measured against the 1024^2 figure would claim 270% MFU."""
    from core.flops import matmul_ceiling_gflops

    h100 = {1024: 150_000.0, 2048: 480_000.0, 4096: 700_000.0, 8192: 720_000.0}
    asked = []

    def measure(n):
        asked.append(n)
        return h100[n]

    ceiling = matmul_ceiling_gflops(measure, "cuda")
    assert ceiling == 720_000.0 and asked == [1024, 2048, 4096, 8192]
    assert 400_000.0 / ceiling <= 1.0
    asked.clear()
    assert matmul_ceiling_gflops(measure, "cpu") == 150_000.0 and asked == [1024]   # the CPU: one size, as before
    flat = {1024: 100.0, 2048: 104.0}
    assert matmul_ceiling_gflops(flat.__getitem__, "metal") == 104.0                # stops once it levels off


def test_looped_blocks_count_once_per_pass_and_a_float_mlp_mult_its_width():
    from core.config import ModelSpec

    flat = ModelSpec(num_layers=11, num_loops=2, loop_start=3, loop_end=5, mlp_mult=4.0)
    d, F = 512, 2048
    per_block = 2 * d * d + 2 * 256 * d + 2 * F * d
    assert matmul_params(flat) == 11 * per_block + 1024 * d
    assert matmul_params(flat, looping=True) == 17 * per_block + 1024 * d      # 11 + 2 x (3..5)
    assert attention_flops_per_token(flat, 7, looping=True) == 2 * 17 * d * 8
    assert matmul_params(ModelSpec(num_layers=1, model_dim=64, num_heads=4, num_kv_heads=4, mlp_mult=2.5,
                                   vocab_size=8)) == 2 * 64 * 64 + 2 * 64 * 64 + 2 * 160 * 64 + 8 * 64
