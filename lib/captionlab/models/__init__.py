"""Models: vision encoders, the GPT-2 decoder, captioners, LLaVA, CLIP, ViT (import the submodules directly)."""
