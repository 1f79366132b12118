import pytest
import torch

from gen.adapter import LoraAdapter
from gen.concepts import (
    TokenPool,
    UnknownConcept,
    check_known,
    concept_text,
    parse_mentions,
    parse_style,
    refuse_placeholders,
    refuse_spliced_placeholders,
    substitute,
)
from gen.errors import InvalidRequest
from gen.tiny import build_tiny_pipeline


def adapter(trigger=None, class_word=None, new_tokens=(), embeddings=None):
    return LoraAdapter(
        tensors={}, rank=1, alpha=1.0, target_modules=(), base_fingerprint="x", trigger=trigger, class_word=class_word,
        new_tokens=new_tokens, token_embeddings=embeddings or {},
    )


def test_mentions_with_and_without_weights():
    prompt = "a photo of <rex> and <my.cat-2:0.8> near <rex> in <Fido@home+1:-0.5> style"
    assert [(m.name, m.weight) for m in parse_mentions(prompt)] == [("rex", 1.0), ("my.cat-2", 0.8), ("Fido@home+1", -0.5)]
    assert parse_mentions("no mentions, a <3 heart and a < b > c") == []
    assert [(m.name, m.weight) for m in parse_mentions("<rex: 0.5> by <cat : -0.25 > and <dog >")] == [("rex", 0.5), ("cat", -0.25), ("dog", 1.0)]
    assert substitute(prompt, {"rex": "sks dog", "my.cat-2": "zwx cat", "Fido@home+1": "fido"}) == (
        "a photo of sks dog and zwx cat near sks dog in fido style"
    )


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("<rex:0.5> and <rex:0.7>", "<rex> is mentioned with two different weights"),
        ("<rex:lots>", "weight 'lots' is not a number"),
        ("<rex:3>", r"weight 3 is outside \[-2.0, 2.0\]"),
        ("<rex:nan>", "weight 'nan' is not a number"),
        ("<rex:\u0660.\u0665>", "weight '\u0660.\u0665' is not a number"),  # Arabic-Indic digits: float() reads 0.5
        ("<rex:0_5>", "weight '0_5' is not a number"),
        ("<Bespoke-Token-3>", "reserved token"),
    ],
)
def test_bad_mentions_are_refused(prompt, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_mentions(prompt)


def test_style_parameter():
    assert parse_style(" watercolor:0.6 ").weight == 0.6
    assert parse_style("watercolor").weight == 1.0
    with pytest.raises(InvalidRequest, match="is not a concept name"):
        parse_style("water color")


def test_unknown_concept_lists_the_users_concepts():
    mentions = parse_mentions("<rex> <rexx>")
    with pytest.raises(UnknownConcept, match=r"user 'alice' has no concept <rexx>; their concepts: <cat>, <rex>"):
        check_known("alice", mentions, ["rex", "cat"])
    with pytest.raises(UnknownConcept, match="their concepts: none yet"):
        check_known("bob", mentions, [])


def test_concept_text_uses_trigger_class_word_and_local_placeholders():
    assert concept_text(adapter("sks", "dog"), "rex", 0) == "sks dog"
    assert concept_text(adapter(None, "dog"), "rex", 0) == "dog"
    assert concept_text(adapter(), "rex", 0) == "rex"
    pivotal = adapter("<s1><s10> toy", "robot", new_tokens=("<s1>", "<s10>"))  # <s1> is a prefix of <s10>
    assert concept_text(pivotal, "bot", 3) == "<bespoke-token-3><bespoke-token-4> toy robot"
    with pytest.raises(InvalidRequest, match="reserved token"):
        concept_text(adapter("<bespoke-token-0>"), "sneaky", 0)
    with pytest.raises(InvalidRequest, match="reserved token"):
        refuse_placeholders("blurry, <BESPOKE-TOKEN-2>")


def test_names_with_combining_marks_are_mentioned_in_nfc():
    """The registry accepts letters, digits and combining marks of any script; so must the mention grammar."""
    assert [(m.name, m.weight) for m in parse_mentions("a photo of <नमस्ते:0.5> and <ki\u0301m>")] == [("नमस्ते", 0.5), ("k\u00edm", 1.0)]
    assert parse_style("नमस्ते").name == "नमस्ते"
    assert substitute("<ki\u0301m> and <नमस्ते>", {"k\u00edm": "sks dog", "नमस्ते": "zwx cat"}) == "sks dog and zwx cat"
    assert parse_mentions("<a,b> <\u0301x> <a b>") == []  # not names: left as text, as before


@pytest.mark.parametrize(
    "prompt, texts",
    [
        ("a <bespoke-token-<0>> photo", {"0": "0"}),  # a concept without trigger reads as its name
        ("<bespoke-token-<a><b>>", {"a": "1", "b": "2"}),  # digits from two mentions
        ("<bespo\u212ae-token-<a>", {"a": "3>"}),  # Kelvin sign: the tokenizer lowercases it to k
    ],
)
def test_placeholders_spliced_from_prompt_and_concept_texts_are_refused(prompt, texts):
    with pytest.raises(InvalidRequest, match="expand to .*, a reserved token"):
        refuse_spliced_placeholders(prompt, texts)


def test_a_concepts_own_placeholders_are_not_refused():
    texts = {"bot": "<bespoke-token-0> robot", "pal": "<bespoke-token-1>"}
    refuse_spliced_placeholders("<bespoke-token-<bot> and <pal>5>", texts, suffix=", <bespoke-token-2> style")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_pipeline("sdxl")  # two text encoders sharing one tokenizer


def test_token_pool_lends_rows_and_writes_embeddings(sdxl):
    pool = TokenPool(sdxl, size=3)
    tokenizer = sdxl.tokenizer
    ids = tokenizer("a <bespoke-token-2> dog", add_special_tokens=False).input_ids
    assert len(ids) == 3 and tokenizer.convert_ids_to_tokens(ids[1]) == "<bespoke-token-2>"  # one token each

    hidden = sdxl.text_encoder.config.hidden_size
    both = adapter(new_tokens=("<a>", "<b>"), embeddings={"text_encoder": torch.ones(2, hidden), "text_encoder_2": 2 * torch.ones(2, hidden)})
    first_only = adapter(new_tokens=("<c>",), embeddings={"text_encoder": 3 * torch.ones(1, hidden)})
    lent = pool.assign({"ab": both, "c": first_only, "plain": adapter()})
    assert sorted(lent) == ["ab", "c"] and sorted(lent["ab"] + lent["c"]) == [0, 1, 2]

    def row(encoder, key, i):
        token_id = tokenizer.convert_tokens_to_ids(pool.tokens[lent[key][i]])
        return getattr(sdxl, encoder).get_input_embeddings().weight[token_id]

    assert torch.equal(row("text_encoder", "ab", 1), torch.ones(hidden))
    assert torch.equal(row("text_encoder_2", "ab", 1), 2 * torch.ones(hidden))
    assert torch.equal(row("text_encoder_2", "c", 0), torch.zeros(hidden))  # no embedding given for this encoder
    text = "<bespoke-token-0><bespoke-token-1> and <bespoke-token-2>"  # local numbering within one request
    rendered = pool.render(text, [("ab", 0), ("ab", 1), ("c", 0)], lent)
    assert rendered == "".join(pool.tokens[lent["ab"][i]] for i in (0, 1)) + " and " + pool.tokens[lent["c"][0]]

    assert pool.assign({"c": first_only}) == {"c": lent["c"]}  # resident: same row, nothing rewritten
    newcomer = adapter(new_tokens=("<d>", "<e>"), embeddings={"text_encoder": torch.zeros(2, hidden)})
    lent2 = pool.assign({"c": first_only, "d": newcomer})  # evicts "ab", the least recent
    assert lent2["c"] == lent["c"] and sorted(lent2["d"]) == sorted(lent["ab"])
    with pytest.raises(InvalidRequest, match="more than the 3 placeholder tokens"):
        pool.assign({"ab": both, "d": newcomer})
