"""Task accuracy through lm-evaluation-harness (``lm-eval``, the optional extra ``gptq-plugin[eval]``).

``gptq-plugin eval MODEL --tasks wikitext2_cloze`` loads MODEL through the plugin (a GPTQ checkpoint runs on the
plugin's kernels, an original model on Transformers) and hands it to lm-eval's ``HFLM``; lm-eval then scores the
tasks exactly as it scores any Hugging Face model.

``wikitext2_cloze`` is this project's offline task, built from the evaluation text so that it needs no download:
a LAMBADA-style last-word prediction (Paperno et al., ACL 2016; lm-eval's ``lambada_openai`` scores it the same
way). From WikiText-2's raw ``test`` split (the file the perplexity protocol reads, shipped with the package):

* a document is one paragraph: a non-empty line that is not a ``= heading =``;
* it is kept when it has at least :data:`MIN_WORDS` space-separated words, ends with ``" ."``, and the word before
  that final period is alphabetic (``[A-Za-z]+``, at least two letters);
* the context is the paragraph up to that word (without the space before it), the target is ``" " + word``.

Unlike LAMBADA, the passages were not filtered by people for words that need the whole context, so the task is
easier and some targets are guessable from the sentence alone. lm-eval reports ``acc``: the fraction of documents
whose target tokens are each the model's argmax (greedy), and ``perplexity``: ``exp`` of the mean negative
log-likelihood of the targets. Other lm-eval task names are passed through to lm-eval as they are (they need their
data available offline, e.g. in the Hugging Face datasets cache).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from .calibration_data import default_eval_file, read_text
from .errors import ConfigError, GPTQPluginError

CLOZE_TASK = "wikitext2_cloze"
MIN_WORDS = 40
_WORD = re.compile(r"[A-Za-z]{2,}")


def cloze_documents(path: str | Path | None = None, min_words: int = MIN_WORDS) -> list[dict]:
    """The ``wikitext2_cloze`` documents of a WikiText-style raw text, in file order.

    Args:
        path: the text (``.gz`` is decompressed); None for WikiText-2's ``wiki.test.raw`` shipped with the package.
        min_words: fewest space-separated words (final period included) a paragraph needs.

    Returns:
        ``[{"context": str, "target": str}]``; ``target`` is ``" " + word``, and ``context + target + " ."`` is the
        paragraph.

    Raises:
        CalibrationError: the file is missing or unreadable (from :func:`read_text`).
        GPTQPluginError: the text holds no paragraph that qualifies.
    """
    src = default_eval_file() if path is None else path
    docs = []
    for line in read_text(src, "cloze text").split("\n"):
        para = line.strip()
        if not para or para.startswith("="):
            continue
        words = para.split(" ")
        if len(words) >= min_words and words[-1] == "." and _WORD.fullmatch(words[-2]):
            docs.append({"context": " ".join(words[:-2]), "target": " " + words[-2]})
    if not docs:
        raise GPTQPluginError(f"{src} holds no paragraph for the cloze task (>= {min_words} words ending in "
                              "'<word> .'): use WikiText-style raw text")
    return docs


def cloze_task_config(data_file: str | Path, cache_dir: str | Path | None = None) -> dict:
    """lm-eval's task config (the dict form of a task YAML) for ``wikitext2_cloze`` over the JSONL ``data_file``
    written from :func:`cloze_documents`: log-likelihood of the target, metrics ``acc`` (greedy) and
    ``perplexity``, as lm-eval's ``lambada_openai``. ``cache_dir``: where Hugging Face ``datasets`` prepares the
    file (None: its default cache)."""
    kwargs = {"data_files": {"test": str(data_file)}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    return {
        "task": CLOZE_TASK,
        "dataset_path": "json",
        "dataset_kwargs": kwargs,
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


def check_tasks(tasks: list[str]):
    """lm-eval's ``TaskManager``, after checking that lm-eval is installed and knows every name in ``tasks``
    (``wikitext2_cloze`` is this module's own).

    Raises:
        ConfigError: lm-eval is not installed (names the extra to install), ``tasks`` is empty, or lm-eval knows
            no task of that name.
    """
    if not tasks:
        raise ConfigError(f"--tasks is empty: name lm-eval tasks, e.g. --tasks {CLOZE_TASK}")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ConfigError(f"--tasks needs lm-evaluation-harness ({e}): pip install 'gptq-plugin[eval]'") from None
    manager = TaskManager()
    unknown = [t for t in tasks if t != CLOZE_TASK and t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks {unknown[0]}: lm-eval knows no such task; use {CLOZE_TASK} (offline) or an "
                          "lm-eval task whose data is available offline (`lm-eval ls tasks`)")
    return manager


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, max_length: int = 512,
              batch_size: int = 1, text: str | Path | None = None, manager=None) -> dict:
    """Score ``model`` on lm-eval ``tasks`` (zero-shot) through lm-eval's ``HFLM``.

    Args:
        model: a Transformers causal LM (an original, or a GPTQ checkpoint loaded by
            :func:`gptq_plugin.models.load_model`).
        tokenizer: its tokenizer.
        tasks: lm-eval task names; ``wikitext2_cloze`` is built here from ``text``.
        limit: score the first ``limit`` documents of each task (None: all).
        max_length: tokens of context + target the model sees (longer contexts lose their start).
        text: the cloze text (None: WikiText-2's ``wiki.test.raw``).
        manager: the ``TaskManager`` that :func:`check_tasks` returned for these ``tasks`` (None: check them
            here; building one indexes every lm-eval task, a few seconds).

    Returns:
        ``{task: {"acc": float, "acc_stderr": float, "perplexity": float, "n": int, ...}}`` with lm-eval's metric
        names (the ``,none`` filter suffix removed).

    Raises:
        ConfigError: lm-eval is not installed, an empty task list, or a task lm-eval does not know.
        GPTQPluginError: lm-eval fails to run a task (e.g. a task whose data is not available offline), or the
            cloze text holds no document.
    """
    if manager is None:
        manager = check_tasks(tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory(prefix="gptq-plugin-tasks-") as tmp:
        specs: list = []
        for name in tasks:
            if name == CLOZE_TASK:
                data = Path(tmp) / f"{CLOZE_TASK}.jsonl"
                data.write_text("".join(json.dumps(d) + "\n" for d in cloze_documents(text)), encoding="utf-8")
                specs.append(cloze_task_config(data, cache_dir=Path(tmp) / "datasets"))  # nothing left behind
            else:
                specs.append(name)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  device=str(next(model.parameters()).device))
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, task_manager=manager,
                                          log_samples=False, bootstrap_iters=1000, verbosity="WARNING")
        except (GPTQPluginError, KeyboardInterrupt):
            raise
        except Exception as e:  # lm-eval's own failures (a dataset that is not available offline, ...)
            raise GPTQPluginError(f"lm-eval could not run --tasks {','.join(tasks)} ({type(e).__name__}: {e})") \
                from None
    res = {}
    for task, metrics in out["results"].items():
        clean = {k.split(",")[0]: v for k, v in metrics.items() if "," in k}
        n = out.get("n-samples", {}).get(task, {})
        clean["n"] = n.get("effective", n.get("original"))
        res[task] = clean
    return res
