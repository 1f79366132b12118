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


def test_the_same_corpus_gives_the_same_vocabulary_in_every_process(tmp_path):
    """tokenizers' BPE trainer broke frequency ties differently per process; ours must not."""
    import os
    import subprocess
    import sys

    script = (
        "import hashlib, sys; from gen.tokenizer import build_clip_tokenizer; "
        "build_clip_tokenizer(['a red mug', 'a blue car', 'two red birds', 'a mug on grass'] * 3, sys.argv[1], num_merges=40); "
        "print(hashlib.sha256(open(sys.argv[1] + '/merges.txt', 'rb').read()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(seed))], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
        for seed in (1, 2, 3)
    }
    assert len(digests) == 1
