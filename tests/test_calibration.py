"""Calibration sources: plain text files, ``.jsonl`` records (text and chat) and their errors.

Hermetic: a word-level tokenizer with a chat template is built in the test (no download, no demo model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptq_plugin.calibration import load_calibration
from gptq_plugin.errors import CalibrationError

WORDS = "a b c d e f g h user assistant system hello world".split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def _tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A word-level tokenizer over WORDS, with ``<eos>`` and the chat markers as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=specials[2:])
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


def _jsonl(path: Path, *lines) -> Path:
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return path


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_records_long_truncated_short_packed_with_eos(tok, tmp_path):
    f = _jsonl(tmp_path / "calib.jsonl", {"text": "a b"}, "", {"text": "a b c d e f", "id": 7}, {"text": "c"},
               {"text": "d e f g"})
    got = load_calibration(f, tok, nsamples=10, seqlen=4)
    eos = tok.eos_token_id
    a, b, c, d, e, f_, g = (_ids(tok, w)[0] for w in "a b c d e f g".split())
    assert got.dtype == torch.long
    # "a b" + eos and "c" + eos are packed; "a b c d e f" is truncated on its own; "d e f g" (= seqlen) likewise;
    # the stream's remainder [eos] is dropped
    assert got.tolist() == [[a, b, c, d], [a, b, eos, c], [d, e, f_, g]]


def test_nsamples_caps_the_windows_and_str_paths_work(tok, tmp_path):
    f = _jsonl(tmp_path / "calib.jsonl", *({"text": "a b c d"} for _ in range(200)))
    got = load_calibration(str(f), tok, nsamples=5, seqlen=3)
    assert got.shape == (5, 3)


def test_chat_records_use_the_chat_template(tok, tmp_path):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world a b"}]
    f = _jsonl(tmp_path / "chat.jsonl", {"messages": msgs})
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    want = _ids(tok, rendered)
    assert want[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.unk_token_id not in want
    got = load_calibration(f, tok, nsamples=4, seqlen=len(want))
    assert got.tolist() == [want]


def test_chat_records_need_a_chat_template(tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", {"text": "a b c"}, {"messages": [{"role": "user", "content": "hello"}]})
    with pytest.raises(CalibrationError, match=r"chat.jsonl line 2 is a chat record, but the model's tokenizer has "
                                               r"no chat template"):
        load_calibration(f, _tokenizer(chat_template=None), nsamples=4, seqlen=2)


@pytest.mark.parametrize("line, why", [
    ("{not json", r"line 3 is not JSON"),
    ('["a"]', r"line 3 is a JSON list, not an object"),
    ('{"prompt": "a"}', r'line 3 has neither "text" nor "messages"'),
    ('{"text": "a", "messages": []}', r'line 3 has both "text" and "messages"'),
    ('{"text": 5}', r'line 3: "text" is int 5: use a non-empty string'),
    ('{"text": ""}', r'line 3: "text" is str \'\': use a non-empty string'),
    ('{"messages": "hi"}', r'line 3: "messages" is str'),
    ('{"messages": [{"role": "user"}]}', r"line 3: messages\[0\] is dict"),
])
def test_a_bad_record_names_the_file_and_line(tok, tmp_path, line, why):
    f = _jsonl(tmp_path / "bad.jsonl", {"text": "a b"}, "", line, {"text": "c d"})
    with pytest.raises(CalibrationError, match=r"calibration file .*bad\.jsonl " + why):
        load_calibration(f, tok, nsamples=4, seqlen=2)


def test_empty_jsonl_and_too_few_tokens(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"empty\.jsonl has no records"):
        load_calibration(tmp_path / "empty.jsonl", tok, nsamples=4, seqlen=2)
    f = _jsonl(tmp_path / "short.jsonl", {"text": "a"})
    with pytest.raises(CalibrationError, match=r"1 records hold 2 tokens, fewer than one window of seqlen=8"):
        load_calibration(f, tok, nsamples=4, seqlen=8)


def test_plain_text_file_and_gz_give_the_same_windows(tok, tmp_path):
    import gzip

    text = "a b c\r\nd e f g h\r\n" * 20
    (tmp_path / "t.txt").write_bytes(text.encode())
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(text.encode()))
    plain = load_calibration(tmp_path / "t.txt", tok, nsamples=100, seqlen=7)
    assert plain.shape == (22, 7)
    assert torch.equal(plain, load_calibration(tmp_path / "t.txt.gz", tok, nsamples=100, seqlen=7))


def test_a_folder_or_missing_file_is_named(tok, tmp_path):
    with pytest.raises(CalibrationError, match=r"is a folder: --dataset expects a text file \(\.txt, \.raw\) or a "
                                               r"\.jsonl file"):
        load_calibration(tmp_path, tok, nsamples=4, seqlen=2)
    with pytest.raises(CalibrationError, match=r"neither a file nor a known source"):
        load_calibration(tmp_path / "nope.jsonl", tok, nsamples=4, seqlen=2)


def test_cli_quantize_with_a_folder_as_dataset_says_so(tmp_path, capsys):
    from gptq_plugin.cli import main
    from tests.tiny import tiny_llama

    model_dir = tmp_path / "m"
    tiny_llama().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    (tmp_path / "texts").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(model_dir), str(tmp_path / "q"), "--dataset", str(tmp_path / "texts"), "--nsamples",
              "2", "--seqlen", "4"])
    assert e.value.code == 2
    assert "is a folder: --dataset expects a text file" in capsys.readouterr().err


def test_transformers_config_accepts_a_jsonl_path(tmp_path):
    """``GPTQPluginConfig(dataset="x.jsonl")`` quantizes on load from the records (the adapter calls
    :func:`load_calibration` with the path)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from gptq_plugin import GPTQPluginConfig
    from tests.tiny import tiny_llama

    src = tmp_path / "m"
    tiny_llama().save_pretrained(src)
    tok = _tokenizer()
    f = _jsonl(tmp_path / "chat.jsonl", *({"messages": [{"role": "user", "content": "hello a b"},
                                                        {"role": "assistant", "content": "world c d e"}]}
                                          for _ in range(4)))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=GPTQPluginConfig(
        bits=4, group_size=32, dataset=str(f), tokenizer=tok, nsamples=4, seqlen=8))
    calib = model.config.quantization_config.meta["calibration"]
    assert calib == {"dataset": str(f), "nsamples": 4, "seqlen": 8}
