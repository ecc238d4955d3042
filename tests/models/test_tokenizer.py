import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.data.instructions import PROMPT_STYLES
from job.models.tokenizer import END_OF_TEXT_ID, ByteTokenizer, TokenizerError, decode_response, encode, load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_hello_world(tok):
    assert encode(tok, "Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"


def test_end_of_text_is_50256(tok):
    assert encode(tok, "<|endoftext|>") == [END_OF_TEXT_ID] == [50256]
    assert tok.n_vocab == 50257


def test_books_formatted_entry_50(tok, book_data):
    entry = book_data[50]
    text = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
        + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")
        + f"\n\n### Response:\n{entry['output']}"
    )
    assert encode(tok, text)[:10] == [21106, 318, 281, 12064, 326, 8477, 257, 4876, 13, 19430]


def test_tampered_or_missing_files_are_refused(tokenizer_dir, tmp_path):
    with pytest.raises(TokenizerError, match="missing"):
        load_tokenizer(tmp_path)
    shutil.copy(tokenizer_dir / "encoder.json", tmp_path)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="vocab.bpe has sha256"):
        load_tokenizer(tmp_path)


@given(st.text())
def test_the_smokes_byte_tokenizer_gives_back_any_text(text):
    tokenizer = ByteTokenizer()
    ids = encode(tokenizer, text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.n_vocab == 257 for i in ids)
    assert ids.count(tokenizer.eot_token) == ids.count(256) == text.count("<|endoftext|>")


def test_the_byte_tokenizer_drops_a_character_cut_at_the_end():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("naïve €")
    assert tokenizer.decode(ids[:-1]) == "naïve " and tokenizer.decode(ids) == "naïve €"
    assert tokenizer.encode("a<|endoftext|>b") == list(b"a<|endoftext|>b")  # special only where allowed
    assert tokenizer.decode([104, 105, 300, 256]) == "hi\ufffd<|endoftext|>"  # past the vocabulary: shown, not lost


@given(st.text(min_size=1, max_size=40), st.data())
def test_a_response_cut_at_any_token_drops_a_character_left_incomplete_and_nothing_else(tok, text, data):
    ids = encode(tok, text)
    cut = data.draw(st.integers(0, len(ids)))
    response = decode_response(tok, ids[:cut])
    whole = tok.decode_bytes(ids[:cut])
    # What is shown is the text's own beginning: the longest prefix of it that the bytes hold whole.
    assert text.startswith(response) and response == whole.decode("utf-8", errors="ignore")
    assert decode_response(tok, ids) == text


def test_a_response_ending_mid_character_shows_no_replacement_character(tok):
    ids = encode(tok, "Un robot 🤖 et 量子")
    cut = next(n for n in range(len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))  # tiktoken's own decode
    assert decode_response(tok, ids[:cut]) == tok.decode(ids[:cut])[:-1]
    assert "\ufffd" in decode_response(tok, [tok.encode_single_token(b"\xff"), 64])  # inside: still shown


# --- a Hugging Face tokenizer.json (Llama 3's and Qwen3's kind), trained here with `tokenizers` --------


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory, book_data):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([e["instruction"] + " " + e["output"] for e in book_data], trainer)
    path = tmp_path_factory.mktemp("hf-tokenizer")
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"eos_token": {"content": "<|eot_id|>", "special": True}, "pad_token": "<|end_of_text|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_a_tokenizer_json_gives_transformers_ids_and_its_end_and_padding_tokens(hf_tokenizer_dir, book_data):
    from transformers import PreTrainedTokenizerFast

    from job.models.tokenizer import load_hf_tokenizer

    ours = load_hf_tokenizer(hf_tokenizer_dir)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_dir / "tokenizer.json"))
    assert (ours.end_id, ours.pad_id) == (2, 1) and ours.n_vocab == len(theirs)
    for entry in book_data[:50]:
        text = PROMPT_STYLES["alpaca"].format_example(entry)
        ids = encode(ours, text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text and ours.decode_bytes(ids) == text.encode()


@given(st.text(max_size=60), st.data())
@settings(max_examples=60, deadline=None)
def test_a_tokenizer_json_response_cut_at_any_token_drops_only_a_character_left_incomplete(
    hf_tokenizer_dir, text, data
):
    from job.models.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(hf_tokenizer_dir)
    ids = tok.encode(text)
    cut = data.draw(st.integers(0, len(ids)))
    shown, whole = decode_response(tok, ids[:cut]), tok.decode_bytes(ids[:cut])
    assert "\ufffd" not in shown and whole.startswith(shown.encode()) and len(whole) - len(shown.encode()) <= 3
    assert decode_response(tok, ids) == text


def test_a_tokenizer_config_without_an_end_token_or_naming_an_unknown_one_is_refused(hf_tokenizer_dir, tmp_path):
    from job.models.tokenizer import TokenizerError, load_hf_tokenizer

    (tmp_path / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    for config, message in (({}, "names no eos_token"), ({"eos_token": "<|nope|>"}, "end token '<|nope|>' is not in")):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(TokenizerError, match=message):
            load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="is not a tokenizer we can read"):
        load_hf_tokenizer(tmp_path)
