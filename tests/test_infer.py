"""The one inference entry (model.infer): the precision policy, inference mode, capture, core split."""
import pytest
import torch

from conftest import sharp_test_vit as tiny
from vitsift_core.model.infer import PRECISIONS, amp_precision, forward_precision, infer


def test_the_precision_policy():
    assert PRECISIONS == ("auto", "fp32", "bf16")
    assert [forward_precision(d, p) for d, p in [("cpu", "auto"), ("cuda", "auto"), ("cpu", "bf16"),
                                                 ("cuda", "fp32")]] == ["fp32", "bf16-autocast", "bf16-autocast", "fp32"]
    assert amp_precision(True) == "auto" and amp_precision(False) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        forward_precision("cpu", "fp16")


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "cores"])
def test_infer_runs_every_forward_under_the_policy(split):
    """auto on CPU: fp32, bit-identical to a plain forward; bf16: autocast, in the pool threads too."""
    model = tiny(0)
    x = torch.randn(4, 3, *model.default_cfg["input_size"][1:])
    seen, maps = [], {}

    def fwd(xs):
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen.append((torch.is_inference_mode_enabled(), amp))
        return model.forward_features(xs)

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for precision in PRECISIONS:
            seen.clear()
            out = infer(model, x, forward=fwd, precision=precision, split=split,
                        collector=lambda l, a: maps.__setitem__((precision, l), a.dtype), layers=[2])
            want = torch.bfloat16 if precision == "bf16" else None
            assert seen and set(seen) == {(True, want)}, precision
            assert out.shape == (4, 1 + model.patch_embed.num_patches, model.embed_dim)
            if precision != "bf16" and not split:                 # fp32: the plain forward, to the bit
                with torch.inference_mode():
                    assert torch.equal(infer(model, x, precision=precision, split=False), model.forward_features(x))
        assert maps[("auto", 2)] == maps[("fp32", 2)] == torch.float32
        assert sorted(maps) == [(p, 2) for p in sorted(PRECISIONS)]
        one = infer(model, x, precision="fp32", split=False)
        torch.testing.assert_close(infer(model, x, precision="auto", split=split), one, atol=1e-5, rtol=0)
        assert infer(model, x, collector=lambda l, a: None, layers=[1], stop_early=True, split=split) is None
        head = infer(model, x, head=lambda t: t[:, 0], split=split)                   # on the whole batch
        torch.testing.assert_close(head, one[:, 0], atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(n)


def _cpuinfo(tmp_path, name, flags):
    p = tmp_path / name
    p.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    return str(p)


def test_native_bf16_read_from_cpu_flags(tmp_path):
    from vitsift_core.model.infer import cpu_flags, native_cpu_bf16
    avx2 = _cpuinfo(tmp_path, "avx2", "fpu sse avx avx2 fma")
    bf16 = _cpuinfo(tmp_path, "bf16", "fpu avx2 avx512f avx512_bf16")
    amx = _cpuinfo(tmp_path, "amx", "fpu avx2 amx_tile amx_bf16")
    assert cpu_flags(avx2) == {"fpu", "sse", "avx", "avx2", "fma"}
    assert [native_cpu_bf16(p) for p in (avx2, bf16, amx)] == [False, True, True]
    assert native_cpu_bf16(str(tmp_path / "missing")) is None     # not Linux: unknown, never warns


def test_emulated_bf16_warns_once_and_only_there(tmp_path):
    from vitsift_core.model.infer import warn_emulated_bf16
    avx2 = _cpuinfo(tmp_path, "avx2", "fpu avx2")
    amx = _cpuinfo(tmp_path, "amx", "fpu amx_bf16")
    with pytest.warns(RuntimeWarning, match="avx512_bf16 or amx_bf16"):
        assert warn_emulated_bf16(avx2)
    assert not warn_emulated_bf16(avx2)            # once per process
    assert not warn_emulated_bf16(amx)
    assert not warn_emulated_bf16(str(tmp_path / "missing"))


def test_forward_precision_warns_only_for_an_explicit_cpu_bf16(monkeypatch):
    import vitsift_core.model.infer as I
    calls = []
    monkeypatch.setattr(I, "warn_emulated_bf16", lambda: calls.append(1))
    for d, p in [("cpu", "auto"), ("cpu", "fp32"), ("cuda", "bf16"), ("cuda", "auto")]:
        I.forward_precision(d, p)
    assert calls == []
    assert I.forward_precision("cpu", "bf16") == "bf16-autocast" and calls == [1]

