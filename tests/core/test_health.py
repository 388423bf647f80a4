"""core/health: a training quantizer whose usage stays low warns once, amortised reads only, can be turned off."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from vector_quantize_pytorch.core import health
from vector_quantize_pytorch.core.health import CodebookCollapseWarning
from vector_quantize_pytorch.usage import CodebookUsage


class Quantizer(nn.Module):
    """Stands in for a family: its training forward hands its indices to the health check."""

    def __init__(self, codebook_size: int = 256):
        super().__init__()
        self.codebook_size = codebook_size
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, indices, mask=None):
        health.observe(self, indices, self.codebook_size, mask=mask)
        return indices


LFQ = type("LFQ", (Quantizer,), {})  # named like the family, so that the warning names LFQ's remedies


@pytest.fixture(autouse=True)
def check_on():
    with health.health_check(True):
        yield


def collapsed(tokens=512):
    return torch.zeros(2, tokens // 2, dtype=torch.long)  # every token on code 0


def healthy(codebook_size=256, tokens=512, generator=None):
    return torch.randint(codebook_size, (2, tokens // 2), generator=generator)


def run(module, make_indices, steps, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, steps + 1):
            module(make_indices(), **kwargs)
            for w in caught:
                w.step = getattr(w, "step", step)
    return [w for w in caught if issubclass(w.category, CodebookCollapseWarning)]


def test_collapsed_codebook_warns_once_after_the_warmup_naming_the_remedies():
    module = LFQ()
    health.configure(module, warmup=20, every=10)
    caught = run(module, collapsed, steps=100)
    assert len(caught) == 1
    assert caught[0].step == 20  # the first window that may warn
    message = str(caught[0].message)
    assert "LFQ used 1 of its 256 codes in the 2 training forwards counted of its last 10 (up to forward 20" in message
    assert "spherical=True" in message and "soft_clamp_input_value" in message and "normalization" in message
    assert "set_health_check(False)" in message


def test_default_windows_warn_by_step_200():
    caught = run(LFQ(), collapsed, steps=health.DEFAULT_WARMUP)
    assert len(caught) == 1 and caught[0].step == health.DEFAULT_WARMUP


def test_healthy_codebook_never_warns():
    generator = torch.Generator().manual_seed(0)
    module = Quantizer()
    health.configure(module, warmup=10, every=10)
    assert run(module, lambda: healthy(generator=generator), steps=100) == []
    report = health.last_report(module)
    # one forward in DEFAULT_STRIDE (5) is counted: 2 of the window's 10
    assert report["step"] == 100 and report["relative_usage"] > 0.95 and report["tokens"] == 2 * 512


def test_usage_is_relative_to_the_tokens_of_one_forward():
    # 2^32 codes, 8 tokens a forward: 8 distinct codes a forward is all a forward can use
    module = Quantizer(codebook_size=2**32)
    health.configure(module, warmup=10, every=10)
    counter = iter(range(10**6))
    distinct = lambda: torch.tensor([[next(counter) * 7919 for _ in range(8)]])
    assert run(module, distinct, steps=50) == []
    assert health.last_report(module)["relative_usage"] >= 1
    # ... and 1 code in every forward's 8 tokens is a collapse
    module = Quantizer(codebook_size=2**32)
    health.configure(module, warmup=10, every=10)
    assert len(run(module, lambda: torch.tensor([[5] * 8]), steps=50)) == 1


def test_one_batch_trained_on_again_and_again_is_not_a_collapse():
    # 8192 codes, the same 512 tokens every forward, all on different codes
    module = Quantizer(codebook_size=8192)
    batch = torch.randperm(8192)[:512].view(2, 256)
    assert run(module, lambda: batch, steps=300) == []
    assert health.last_report(module)["relative_usage"] == 1


def test_masked_and_dropped_positions_are_not_counted():
    module = Quantizer(codebook_size=16)
    health.configure(module, warmup=1, every=1)
    indices = torch.tensor([[3, -1, -1, -1]])
    mask = torch.tensor([[True, True, False, False]])
    run(module, lambda: indices, steps=1, mask=mask)
    assert health.last_report(module)["tokens"] == 1


def test_a_flat_token_mask_covers_every_codebook_of_its_token():
    module = Quantizer(codebook_size=16)
    health.configure(module, warmup=1, every=1)
    indices = torch.arange(2 * 3 * 4).remainder(16).view(2, 3, 4)  # (b, n, codebooks)
    mask = torch.tensor([True, False, True, True, False, False])  # (b * n,)
    run(module, lambda: indices, steps=1, mask=mask)
    assert health.last_report(module)["tokens"] == 3 * 4


def test_only_one_forward_in_stride_is_counted(monkeypatch):
    updates = []
    original = CodebookUsage.update
    monkeypatch.setattr(CodebookUsage, "update", lambda self, *a, **kw: updates.append(1) or original(self, *a, **kw))
    module = Quantizer()
    run(module, healthy, steps=4)
    assert updates == [] and health._states[module].meter is None  # nothing allocated, nothing counted yet
    run(module, healthy, steps=96)
    assert len(updates) == 100 // health.DEFAULT_STRIDE


def test_an_empty_batch_is_skipped():
    module = Quantizer()
    module(torch.zeros(0, 4, dtype=torch.long))
    module(torch.zeros(2, 0, dtype=torch.long), mask=torch.zeros(2, 0, dtype=torch.bool))
    assert module not in health._states


def test_low_usage_before_the_warmup_does_not_warn():
    module = Quantizer()
    health.configure(module, warmup=50, every=10)
    phase = iter([collapsed] * 40 + [healthy] * 100)
    assert run(module, lambda: next(phase)(), steps=100) == []


def test_eval_mode_is_not_counted():
    module = Quantizer().eval()
    assert run(module, collapsed, steps=300) == []
    assert health.last_report(module) is None


def test_global_switch_and_context_manager():
    with health.health_check(False):
        assert not health.health_check_enabled()
        assert run(LFQ(), collapsed, steps=300) == []
    assert health.health_check_enabled()
    health.set_health_check(False)
    try:
        assert run(LFQ(), collapsed, steps=300) == []
    finally:
        health.set_health_check(True)
    assert len(run(LFQ(), collapsed, steps=300)) == 1


def test_one_module_turned_off():
    module = LFQ()
    health.configure(module, enabled=False)
    assert run(module, collapsed, steps=300) == []
    assert health.last_report(module) is None


def test_configure_refuses_bad_values():
    with pytest.raises(ValueError, match="threshold"):
        health.configure(Quantizer(), threshold=1.5)
    with pytest.raises(ValueError, match="every"):
        health.configure(Quantizer(), every=0)
    with pytest.raises(ValueError, match="stride"):
        health.configure(Quantizer(), stride=0)


def test_meter_is_read_once_per_window(monkeypatch):
    reads = []
    original = CodebookUsage.report
    monkeypatch.setattr(CodebookUsage, "report", lambda self, **kw: reads.append(1) or original(self, **kw))
    module = Quantizer()
    health.configure(module, warmup=0, every=25)
    run(module, healthy, steps=100)
    assert len(reads) == 4


def test_module_state_and_outputs_are_untouched():
    module = LFQ()
    keys = list(module.state_dict())
    buffers = [name for name, _ in module.named_buffers()]
    attributes = set(vars(module))
    indices = healthy()
    assert module(indices) is indices
    run(module, collapsed, steps=300)
    assert list(module.state_dict()) == keys
    assert [name for name, _ in module.named_buffers()] == buffers
    assert set(vars(module)) == attributes


def test_state_is_dropped_with_the_module():
    import gc

    module = Quantizer()
    run(module, healthy, steps=3)
    gc.collect()
    count = len(health._states)
    del module
    gc.collect()
    assert len(health._states) == count - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_synchronisation_between_reads_on_cuda():
    module = Quantizer().cuda()
    health.configure(module, warmup=0, every=50)
    indices = torch.randint(256, (2, 256), device="cuda")
    module(indices)  # first call creates the meter
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(48):  # steps 2 ... 49: no read
            module(indices)
    finally:
        torch.cuda.set_sync_debug_mode("default")
