"""Knowledge fusion of language models across tokenizers: FuseLLM and FuseChat.

`align`: token / vocabulary / distribution alignment between two tokenizers.
"""
