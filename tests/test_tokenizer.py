import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from job.tokenizer import END_OF_TEXT_ID, ByteTokenizer, TokenizerError, decode_response, encode, load_tokenizer


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
    assert all(0 <= i < 256 or i == END_OF_TEXT_ID for i in ids)
    assert ids.count(END_OF_TEXT_ID) == text.count("<|endoftext|>")


def test_the_byte_tokenizer_drops_a_character_cut_at_the_end():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("naïve €")
    assert tokenizer.decode(ids[:-1]) == "naïve " and tokenizer.decode(ids) == "naïve €"
    assert tokenizer.encode("a<|endoftext|>b") == list(b"a<|endoftext|>b")  # special only where allowed
    assert tokenizer.decode([104, 105, 300, END_OF_TEXT_ID]) == "hi\ufffd<|endoftext|>"  # no byte: shown, not lost


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
