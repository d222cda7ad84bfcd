"""Thin adapters that register gptq-plugin with serving and modelling frameworks (vLLM, Transformers, TGI).

Each adapter imports its framework lazily; importing this package imports no framework.
"""

if __name__ != "gptq_plugin.adapters":  # found as a top-level `adapters` (the checkout root is on sys.path):
    # hand the name to the installed package `adapters`, if any (gptq_plugin/_toplevel.py)
    from os.path import abspath as _abs, dirname as _dir, join as _join
    from runpy import run_path as _run_path

    _run_path(_join(_dir(_dir(_abs(__file__))), "gptq_plugin", "_toplevel.py"))["hand_over"](__name__, __file__)
    del _abs, _dir, _join, _run_path
