"""Pure torch: the contrastive math (losses, cross-rank gather, temperature, text queue, head,
pooling, prompts, metrics, settings). Nothing here imports transformers, llava, peft or deepspeed,
and nothing imports from ``hosts`` or the entry points (tests/test_layering.py enforces it)."""
