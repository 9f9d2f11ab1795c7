"""Conversion memory: each rank holds what it owns plus the tensor being read, not the model.

safetensors maps the HF files: tensors copied unchanged stay file-backed pages until the
checkpoint writer reads them, and only transformed ones (QKV, [gate; up]) become anonymous
memory. The bound is on the resident set actually sampled during the conversion.
"""

import os

import pytest

from tests.checkpoint.conftest import make_hf_model
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

MB = 2**20


def rss_growth(work):
    """How far this process's resident set rose above its start while ``work()`` ran (sampled,
    not ru_maxrss: that high-water mark already holds the import-time peak)."""
    import threading

    import psutil

    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], process.memory_info().rss)

    before = process.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return peak[0] - before


def convert_and_measure(hf_dir, megatron_dir):
    import torch.distributed as dist

    from symnoise_megatron.checkpoint.convert import hf_to_megatron

    growth = rss_growth(lambda: hf_to_megatron(hf_dir, megatron_dir, progress=False))
    return {"rank": dist.get_rank(), "growth": growth}


def test_each_rank_holds_what_it_owns(tmp_path):
    # 58M parameters (232 MB fp32) in 20 MB shards: embeddings 2 x 65 MB, 8 layers of 12.6 MB.
    hf_dir = make_hf_model("llama", dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                                         num_key_value_heads=8, num_hidden_layers=8, vocab_size=32000),
                           str(tmp_path / "hf"), max_shard_size="20MB")
    shards = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
    assert len(shards) >= 5
    model_bytes = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in shards)
    layer_bytes = (4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512) * 4
    embedding_bytes = 32000 * 512 * 4
    results = {r["rank"]: r["growth"] for r in run_distributed(convert_and_measure, 2, hf_dir, str(tmp_path / "mg"))}
    owned = {0: 2 * embedding_bytes + 4 * layer_bytes + 512 * 4, 1: 4 * layer_bytes}
    print({rank: f"{growth / MB:.0f} MB grown, owns {owned[rank] / MB:.0f} MB" for rank, growth in results.items()},
          f"model {model_bytes / MB:.0f} MB")
    # The bound: twice what a rank owns (the tensor read and its converted copy) plus 64 MB.
    for rank, growth in results.items():
        assert growth <= 2 * owned[rank] + 64 * MB, (rank, growth / MB)
    assert results[1] < model_bytes / 2


def export_and_measure(megatron_dir, hf_dir):
    import torch.distributed as dist

    from symnoise_megatron.checkpoint.convert import megatron_to_hf

    # A first export pays the imports and the allocator's first growth (25 MB here); the second is measured.
    megatron_to_hf(megatron_dir, hf_dir + "-warm-up", progress=False)
    growth = rss_growth(lambda: megatron_to_hf(megatron_dir, hf_dir, progress=False))
    return {"rank": dist.get_rank(), "growth": growth}


def test_export_holds_one_layer_tensor_at_a_time(tmp_path):
    # 8 layers of 14 MB (fp32), a 4 MB embedding: a stacked fc1 (8 layers) is 45 MB, one layer's 5.6 MB.
    hf_dir = make_hf_model("llama", dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                                         num_key_value_heads=8, num_hidden_layers=8, vocab_size=2000),
                           str(tmp_path / "hf"))
    layer_bytes = (4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512) * 4
    run_distributed(convert_and_measure, 2, hf_dir, str(tmp_path / "mg"))
    results = {r["rank"]: r["growth"] for r in run_distributed(export_and_measure, 2, str(tmp_path / "mg"),
                                                                 str(tmp_path / "back"))}
    print({rank: f"{growth / MB:.1f} MB grown" for rank, growth in results.items()}, f"layer {layer_bytes / MB:.1f} MB")
    # Reading whole stacked tensors, as the export did before streaming, grew a rank by 120 MB.
    for rank, growth in results.items():
        assert growth <= 2 * layer_bytes, (rank, growth / MB)
