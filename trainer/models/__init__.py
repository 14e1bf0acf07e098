"""Model folders from a name, including the models the project builds itself.

resolve.py  resolve_model: an alias, a local folder or a hub id to a HF folder; SmolLM2 from its GGUF; tiny test models
demo.py     the CPU demo's policy: a tiny Llama warm-started to reason verbosely on toy arithmetic
"""
