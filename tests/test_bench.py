"""mimkit bench: FLOP accounting of the GEMM profile, the compiled-blocks option."""

import json

import torch

from mimkit.bench import _gemm_flops, main as bench_main
from mimkit.models.vit import EncoderSpec, ViTEncoder, compile_blocks


def test_gemm_flops_from_recorded_shapes():
    assert _gemm_flops("aten::mm", [[4, 5], [5, 6]]) == 2 * 4 * 5 * 6
    assert _gemm_flops("aten::addmm", [[6], [4, 5], [5, 6], [], []]) == 2 * 4 * 5 * 6
    assert _gemm_flops("aten::bmm", [[3, 4, 5], [3, 5, 6]]) == 2 * 3 * 4 * 5 * 6
    assert _gemm_flops("aten::mm", [[4, 5]]) == 0.0


def test_bench_rows_account_for_their_matrix_multiplies(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_main(["--img", "16", "--patch", "4", "--batch", "8", "--repeats", "1", "--warmup", "1",
                       "--methods", "mae", "--no-memory", "--no-write", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["row"] == "MAE" and 0 < row["gemm_share"] <= 1 and row["gemm_efficiency"] > 0
    total = row["gflops_per_img"] * 8  # torch.utils.flop_counter, forward + backward
    # the profiled GEMMs are most of the counted FLOPs (the rest: attention) and never more
    assert 0.7 * total <= row["gemm_gflop"] <= 1.0001 * total


def test_compiled_blocks_keep_names_and_outputs():
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderSpec(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2))
    x = torch.randn(3, 1, 16, 16)
    ref = enc.forward_features(x)
    keys = list(enc.state_dict())
    assert compile_blocks(enc) == 2
    assert list(enc.state_dict()) == keys
    out = enc.forward_features(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.blocks.parameters())


def test_fused_adamw_is_the_default_and_takes_the_same_steps_as_foreach():
    from mimkit.train.optim import build_adamw

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    fused = build_adamw(a.named_parameters(), 1e-2, 0.05, (0.9, 0.95))
    plain = build_adamw(b.named_parameters(), 1e-2, 0.05, (0.9, 0.95), fused=False)
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    x = torch.randn(32, 8)
    for _ in range(5):
        for model, opt in ((a, fused), (b, plain)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # a foreach optimiser's state (an older checkpoint) resumes in the fused one
    again = build_adamw(b.named_parameters(), 1e-2, 0.05, (0.9, 0.95))
    again.load_state_dict(plain.state_dict())
    b(x).square().mean().backward()
    again.step()
    assert all(torch.isfinite(p).all() for p in b.parameters())
