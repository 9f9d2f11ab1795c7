
import pytest
import torch

from tests.distributed import run_distributed

# Small random models that transformers itself builds: every layout fact of the conversion.
HF_MODELS = {
    "llama_mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa_untied_32001": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=32001)),
    "llama_one_kv_head": ("llama", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama_tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_rope_scaling": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=8192,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "opt": ("opt", dict(num_attention_heads=4)),
}


def make_hf_model(kind, overrides, directory, seed=0, **save_kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=301,
                      max_position_embeddings=64, rms_norm_eps=1e-5)
        fields.update(overrides)
        model = LlamaForCausalLM(LlamaConfig(**fields))
    else:
        fields = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, vocab_size=301, max_position_embeddings=64,
                      word_embed_proj_dim=64)
        fields.update(overrides)
        model = OPTForCausalLM(OPTConfig(**fields))
    with torch.no_grad():  # random norms and biases, so a mix-up of any two tensors shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(mean=1.0 if "norm" in name and name.endswith("weight") else 0.0, std=0.2)
    model.save_pretrained(directory, **save_kwargs)
    return directory


def convert_all(pairs):
    from symnoise_megatron.checkpoint.convert import hf_to_megatron

    for hf_dir, megatron_dir in pairs:
        hf_to_megatron(hf_dir, megatron_dir, progress=False)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """name -> (hf_dir, megatron_dir), every model converted once on 2 ranks."""
    root = tmp_path_factory.mktemp("converted")
    pairs = {}
    for name, (kind, overrides) in HF_MODELS.items():
        pairs[name] = (make_hf_model(kind, overrides, str(root / name / "hf")), str(root / name / "megatron"))
    run_distributed(convert_all, 2, list(pairs.values()))
    return pairs
