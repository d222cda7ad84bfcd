"""Activating gptq-plugin's TGI loader in TGI's server: the route and the ``gptq-plugin-tgi-server`` command.

TGI has no plugin mechanism: ``--quantize`` is a closed enum and model modules import
``utils/quantization.py:get_loader`` by name. :func:`install` checks that the importable TGI has the interface
the adapter was written against and routes ``get_loader(quantize="gptq", ...)`` to
:class:`gptq_plugin.adapters.tgi.GPTQPluginWeightsLoader` for GPTQ checkpoints, in this process. The user-facing
flag stays ``--quantize gptq``.

TGI's launcher (``text-generation-launcher``) starts each shard as ``text-generation-server serve MODEL
--quantize gptq ...``, found on ``PATH``. :func:`main` (console script ``gptq-plugin-tgi-server``) takes exactly
the same arguments: it installs the route and then runs TGI's own CLI in the same process. To make the launcher
use it, put a link named ``text-generation-server`` to it first on ``PATH`` (see docs/tgi.md)::

    mkdir -p ~/.local/gptq-plugin-tgi && ln -sf "$(command -v gptq-plugin-tgi-server)" \\
        ~/.local/gptq-plugin-tgi/text-generation-server
    PATH=~/.local/gptq-plugin-tgi:$PATH text-generation-launcher --model-id OUT_DIR --quantize gptq
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from gptq_plugin.errors import CheckpointError, ConfigError, GPTQPluginError

from .tgi import GPTQPluginWeight, GPTQPluginWeightsLoader

log = logging.getLogger(__name__)

#: The TGI source this adapter was written and tested against.
TESTED_TGI = ("text-generation-inference v3.3.7-1-gdb931fcf "
              "(commit db931fcf42da018a3657580c64bf2720f167f9ab, 2026-01-08)")

#: The abstract methods of TGI's ``WeightsLoader`` that this adapter implements.
_LOADER_METHODS = frozenset({"get_weights", "get_weights_col_packed", "get_multi_weights_col", "get_weights_row"})
#: The ``Weights`` methods the loader calls.
_WEIGHTS_METHODS = ("get_tensor", "get_sharded", "get_packed_sharded", "has_tensor", "get_shape")


class TGIIncompatibleError(GPTQPluginError):
    """The importable ``text_generation_server`` lacks the interface the TGI adapter needs (or is absent)."""


# --- the route: TGI's get_loader -> the plugin's loader for GPTQ checkpoints ------------------------------------
_original_get_loader: Callable | None = None


def check_tgi() -> str:
    """Check that the importable ``text_generation_server`` has the interface this adapter needs.

    Returns:
        A description of the TGI found (distribution version or source path).

    Raises:
        TGIIncompatibleError: TGI is not importable, or ``get_loader``/``WeightsLoader``/``Weight``/``Weights``
            differ from what the adapter was written against (the message lists every difference).
    """
    try:
        from text_generation_server.utils import quantization, weights
    except ImportError as e:
        raise TGIIncompatibleError(
            f"cannot import TGI's server package text_generation_server ({type(e).__name__}: {e}); install TGI's "
            f"server (`cd text-generation-inference/server && make install-server`) in this environment. "
            f"The adapter was tested against {TESTED_TGI}") from None
    problems = []
    get_loader = getattr(quantization, "get_loader", None)
    if get_loader is None:
        problems.append("utils.quantization.get_loader is missing")
    else:
        params = list(inspect.signature(get_loader).parameters)[:3]
        if params != ["quantize", "model_id", "revision"]:
            problems.append(f"utils.quantization.get_loader takes {params}, expected (quantize, model_id, revision)")
    loader_cls = getattr(weights, "WeightsLoader", None)
    if loader_cls is None:
        problems.append("utils.weights.WeightsLoader is missing")
    else:
        extra = set(getattr(loader_cls, "__abstractmethods__", ())) - _LOADER_METHODS
        if extra:
            problems.append(f"WeightsLoader has abstract methods this adapter does not implement: {sorted(extra)}")
    weight_cls = getattr(weights, "Weight", None)
    if weight_cls is None or set(getattr(weight_cls, "__abstractmethods__", ())) - {"get_linear"}:
        problems.append("utils.weights.Weight is missing or needs more than get_linear(bias)")
    weights_cls = getattr(weights, "Weights", None)
    if weights_cls is None:
        problems.append("utils.weights.Weights is missing")
    else:
        problems += [f"Weights.{m} is missing" for m in _WEIGHTS_METHODS if not hasattr(weights_cls, m)]
        if "to_dtype" not in inspect.signature(weights_cls.get_tensor).parameters:
            problems.append("Weights.get_tensor has no to_dtype parameter")
    found = _tgi_description()
    if problems:
        raise TGIIncompatibleError(f"the installed TGI ({found}) is incompatible with gptq-plugin's TGI adapter: "
                                   + "; ".join(problems) + f". The adapter was tested against {TESTED_TGI}")
    return found


def _tgi_description() -> str:
    try:
        from importlib.metadata import version

        return f"text-generation-server {version('text-generation-server')}"
    except Exception:  # a source checkout on sys.path, not an installed distribution
        mod = sys.modules.get("text_generation_server")
        return f"text_generation_server from {getattr(mod, '__file__', '?')}"


def _read_quantization_config(quantization, model_id: str, revision: str | None) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config`` (``config.json``, else ``quantize_config.json``), or None; read
    with TGI's own helper so Hub model ids resolve as they do in TGI."""
    for filename, key in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        try:
            data = quantization._get_config_json(model_id, revision, filename)
        except Exception:
            continue
        d = data.get(key) if key else data
        if isinstance(d, dict):
            return d
    return None


def _routed_get_loader(quantize: str | None, model_id: str, revision: str | None):
    """TGI's ``get_loader`` with GPTQ checkpoints (``quant_method: "gptq"``) and compressed-tensors ones
    (``quant_method: "compressed-tensors"``, served with ``--quantize gptq``) routed to the plugin's loader;
    everything else (AWQ, other methods, ``--quantize compressed-tensors``, checkpoints without a quantization
    config) goes to TGI's own."""
    from text_generation_server.utils import quantization

    if quantize == "gptq":
        d = _read_quantization_config(quantization, model_id, revision)
        if d is not None and str(d.get("quant_method", "gptq")).lower() in ("gptq", "compressed-tensors"):
            try:
                loader = GPTQPluginWeightsLoader.from_quantization_config(d)
            except (ConfigError, CheckpointError) as e:
                raise type(e)(f"{model_id}: {e}") from None
            _tgi_log(f"gptq-plugin: loading GPTQ weights of {model_id} with {loader!r}")
            return loader
    return _original_get_loader(quantize, model_id, revision)


_routed_get_loader._gptq_plugin_route = True  # type: ignore[attr-defined]


def install() -> str:
    """Route TGI's GPTQ weight loading to gptq-plugin in this process. Idempotent.

    Checks TGI (:func:`check_tgi`), registers :class:`GPTQPluginWeightsLoader` and :class:`GPTQPluginWeight` as
    virtual subclasses of TGI's ``WeightsLoader`` and ``Weight``, and replaces ``get_loader`` in
    ``text_generation_server.utils.quantization`` and in every already-imported TGI module that imported it by
    name. Call it before TGI loads a model (the ``gptq-plugin-tgi-server`` console script does).

    Returns:
        The description of the TGI found.

    Raises:
        TGIIncompatibleError: see :func:`check_tgi`.
    """
    global _original_get_loader
    found = check_tgi()
    from text_generation_server.utils import quantization, weights

    weights.WeightsLoader.register(GPTQPluginWeightsLoader)
    weights.Weight.register(GPTQPluginWeight)
    current = quantization.get_loader
    if not getattr(current, "_gptq_plugin_route", False):
        _original_get_loader = current
    _rebind(_original_get_loader, _routed_get_loader)
    log.info("gptq-plugin: TGI GPTQ loading routed to the plugin (%s)", found)
    return found


def uninstall() -> None:
    """Undo :func:`install`: TGI's own ``get_loader`` again (the virtual-subclass registrations stay)."""
    if _original_get_loader is not None:
        _rebind(_routed_get_loader, _original_get_loader)


def is_installed() -> bool:
    mod = sys.modules.get("text_generation_server.utils.quantization")
    return bool(mod is not None and getattr(getattr(mod, "get_loader", None), "_gptq_plugin_route", False))


def _rebind(old: Callable, new: Callable) -> None:
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith("text_generation_server") and getattr(mod, "get_loader", None) is old:
            mod.get_loader = new


def _tgi_log(message: str) -> None:
    """Log where TGI's server shows it: TGI's loguru sink keeps only records named ``text_generation_server*``."""
    log.info(message)
    try:
        from loguru import logger
    except ImportError:
        return
    logger.patch(lambda record: record.update(name="text_generation_server.gptq_plugin")).info(message)


# --- the console script ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Install the route, then run TGI's CLI with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 2 when TGI is missing or incompatible (one line on stderr says why), else TGI's.
    """
    try:
        install()
    except GPTQPluginError as e:
        print(f"gptq-plugin-tgi-server: error: {e}", file=sys.stderr)
        return 2
    from text_generation_server.cli import app

    try:
        app(args=argv, prog_name="text-generation-server")
    except SystemExit as e:  # typer/click exit with the command's status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
