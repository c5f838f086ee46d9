"""The recipes, installed as ``cgc_hf.recipes`` for the ``cgc-finetune`` / ``cgc-evaluate`` scripts.

In a checkout they run as files (``python recipes/finetune.py``); ``configs/`` installs with them.
"""
