"""Model folders from a name, including the models the project builds itself.

resolve.py     resolve_model: an alias, a local folder or a hub id to a HF folder; SmolLM2 from its GGUF; test models
demo.py        the CPU demo's task and policy: verbose chains of toy arithmetic, a tiny Llama to learn them
warm_start.py  the demo's warm start: its supervised stage, cached, locked, resumable, reproducible per machine
"""
