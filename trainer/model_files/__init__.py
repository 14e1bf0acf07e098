"""Hugging Face model folders as files: safetensors weights checked, read and written; the tokenizer; the cache.

weights.py       safetensors only: a folder's weights checked (pickles refused, damage named) before any is read
hf_folder.py     the cache of built models, a state dict saved as safetensors, the tokenizer checked and loaded
tensor_files.py  safetensors tensors one at a time: listed, read by name, written without holding a file whole
"""
