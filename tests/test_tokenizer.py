from gen.tokenizer import build_clip_tokenizer


def test_corpus_words_are_single_tokens_and_anything_else_falls_back(tmp_path):
    corpus = ["a photo of a red mug on the beach", "two green cats wearing hats"] * 20
    tok = build_clip_tokenizer(corpus, str(tmp_path), num_merges=200)
    for word in ["photo", "mug", "beach", "cats", "wearing"]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    for odd in ["sks", "<rex>", "café", "日本", "zzqx"]:
        ids = tok(odd, add_special_tokens=False).input_ids
        assert len(ids) >= 1 and tok.unk_token_id not in ids
        assert tok.decode(ids).replace(" ", "") == odd
    ids = tok("a mug").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.model_max_length == 77


def test_saved_tokenizer_reloads_identically(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_clip_tokenizer(["a red mug"] * 5, str(tmp_path), num_merges=50)
    again = CLIPTokenizer.from_pretrained(str(tmp_path))
    text = "a red mug and a sks dog"
    assert tok(text).input_ids == again(text).input_ids
