"""Thin adapters that register gptq-plugin with serving and modelling frameworks (vLLM, Transformers, TGI).

Each adapter imports its framework lazily; importing this package imports no framework.
"""
