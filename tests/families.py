"""Tiny random configs of the decoder families the prefix is tested on (tests/test_families.py), and of the kinds
it refuses. Two layers, hidden 32, 4 query heads over 2 key/value heads where the family has grouped-query
attention; MoE families with 4 experts, 2 per token; sliding-window families with a window of 16.

Each entry: (config class name, model class name, config overrides, notes for the table in docs/models.md).
"""

import torch
import transformers

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
              bos_token_id=2, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
WINDOW = 16
# DeepSeek's MLA: one query head per key/value head after decompression (as in the released configs)
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, head_dim=4,
           num_key_value_heads=4)
DROP = object()  # an override that removes a COMMON key the config class does not take

FAMILIES = {
    # name: (config class, model class, overrides, what the family stands for)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "Llama 2/3, and every Llama-shaped model"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW), "Mistral (sliding window)"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2),
                "Mixtral (MoE)"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "Qwen2/2.5"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(MOE, shared_expert_intermediate_size=32),
                  "Qwen1.5/2 MoE (shared expert)"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, "Qwen3"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE), "Qwen3 MoE"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}, "Gemma"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=WINDOW, query_pre_attn_scalar=8),
               "Gemma 2 (sliding window, soft-capping)"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(sliding_window=WINDOW, query_pre_attn_scalar=8, layer_types=["sliding_attention",
                                                                                       "full_attention"]),
                    "Gemma 3 text (sliding window)"),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(resid_pdrop=0.0, embd_pdrop=0.0), "Phi-1/2"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0), "Phi-3/3.5/4"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "OLMo 2"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2), "OLMoE"),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}, "Command-R (logit scale)"),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(sliding_window=WINDOW,
                                                            layer_types=["sliding_attention", "full_attention"]),
                "Command R7B / A (sliding window)"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=None), "StarCoder2"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}, "Granite 3 (logit scaling)"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}, "StableLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_key_value_heads=DROP), "GPT-NeoX, Pythia"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(new_decoder_architecture=True, num_kv_heads=2, head_dim=DROP, num_key_value_heads=DROP),
               "Falcon (new decoder architecture)"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_head=4, num_key_value_heads=DROP), "BLOOM (ALiBi)"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                   num_key_value_heads=DROP, head_dim=DROP), "GPT-2"),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {}, "GLM-4 (0414)"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                      n_group=1, topk_group=1), "GLM-4.5/4.6 (MoE)"),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {}, "EXAONE 4"),
    # its forward cannot run on the meta device: the probe runs one token through the loaded model instead
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM",
               dict(kv_channels=8, head_dim=DROP, num_local_experts=4, num_experts_per_tok=2),
               "JetMoE (mixture of attention heads; probed on the loaded model)"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}, "SmolLM3 (NoPE layers)"),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", {}, "Hunyuan dense"),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", {}, "ERNIE 4.5"),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                     dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0),
                     "ERNIE 4.5 MoE"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                     layer_types=["sliding_attention", "full_attention"]), "gpt-oss (sinks, sliding window, MoE)"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(MLA, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         first_k_dense_replace=1, n_group=1, topk_group=1),
                    "DeepSeek-V3/R1, Kimi K2 (multi-head latent attention, MoE)"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(MLA, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         first_k_dense_replace=1, n_group=1, topk_group=1),
                    "DeepSeek-V2 (multi-head latent attention, MoE)"),
}

# Models a prefix cannot reach, one per refused kind: (config class, overrides, the words the refusal must contain).
REFUSED = {
    "encoder-decoder (T5)": ("T5Config", dict(num_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8),
                             "encoder-decoder"),
    "linear attention (Qwen3-Next)": ("Qwen3NextConfig", dict(layer_types=["linear_attention", "full_attention"]),
                                      "linear_attention"),
    "state-space hybrid (Jamba)": ("JambaConfig", dict(attn_layer_period=2, attn_layer_offset=1),
                                   "linear_attention"),
    "parallel SSM + attention (Falcon-H1)": ("FalconH1Config", {}, "hybrid"),
    "convolution layers (LFM2)": ("Lfm2Config", dict(layer_types=["conv", "full_attention"]), "conv"),
    "Mamba layers (Granite-4.0-H)": ("GraniteMoeHybridConfig",
                                     dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
                                          mamba_n_groups=1, mamba_d_state=8), "linear_attention"),
    "no key/value cache (Mamba)": ("MambaConfig", {}, "linear_attention"),
    "attention ignores past_key_values (GPT-1)": ("OpenAIGPTConfig", dict(n_layer=2, n_embd=32, n_head=4),
                                                  "never writes to past_key_values"),
    "layers of different shapes (Gemma 4 text)": ("Gemma4TextConfig", {}, "different shapes"),
}


def family_config(name: str, **overrides):
    config_cls, model_cls, extra, _ = FAMILIES[name]
    kwargs = dict(COMMON)
    kwargs.update(extra)
    kwargs.update(overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not DROP}
    config = getattr(transformers, config_cls)(**kwargs)
    config.architectures = [model_cls]
    return config


def family_model(name: str, seed: int = 0, **overrides):
    """A 2-layer fp32 model of family ``name`` in eval mode."""
    config = family_config(name, **overrides)
    torch.manual_seed(seed)
    return getattr(transformers, FAMILIES[name][1])(config).eval()


def refused_config(kind: str):
    config_cls, extra, _ = REFUSED[kind]
    if config_cls == "T5Config" or config_cls == "OpenAIGPTConfig":
        return getattr(transformers, config_cls)(vocab_size=VOCAB, **extra)
    kwargs = dict(COMMON)
    kwargs.update(extra)
    return getattr(transformers, config_cls)(**kwargs)
