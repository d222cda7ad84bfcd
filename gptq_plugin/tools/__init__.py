"""Tools around the core, not part of it: the demo (``gptq-plugin demo``, ``demo-model``), serving with vLLM
(``gptq-plugin serve``) and synthetic models for memory measurements (``gptq-plugin synthetic-model``).

The core (``gptq_plugin.*``) never imports from here; these modules import the core.
"""
