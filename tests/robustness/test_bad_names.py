"""Names users choose (users, concepts) through every entry point that takes one.

Path-like names, NUL bytes, bidi overrides, SQL and over-long names are refused with an error
naming the bad name, by the registry (handles and the ``AdapterSource`` face the sampler uses),
the sampler, training and the CLI; names in any script are accepted and stay isolated per user.
"""

from __future__ import annotations

import pytest
from robustness_helpers import bad_inputs, refused, registry_state, short

from adapters.registry import InvalidName
from adapters.registry.synthetic import random_adapter
from adapters.train import personalize
from gen.base import Base
from gen.sampler import Sampler
from gen.tiny import build_tiny_pipeline

NAMES = bad_inputs.NAMES
BAD = [n for n, (_, expect) in NAMES.items() if expect == "refused"]
GOOD = [n for n, (_, expect) in NAMES.items() if expect == "accepted"]


def _label(name: str) -> str:
    shown = name if len(name) <= 24 else name[:21] + "..."
    return f"`{shown.encode('unicode_escape').decode()}`" if shown else "`''`"


class Forward:
    """An AdapterSource that forwards to whichever registry the current test set."""

    target = None

    def get(self, user, concept, version="latest"):
        return self.target.get(user, concept, version)

    def concepts(self, user):
        return self.target.concepts(user)


@pytest.fixture(scope="module")
def sampler():
    """One serving sampler for the module, on a base of its own (serving adds hooks and tokens to its base)."""
    return Sampler(Base.from_pipeline(build_tiny_pipeline("sd")), Forward())


@pytest.mark.parametrize("name", BAD)
def test_bad_user_and_concept_names_are_refused_everywhere(name, populated, sd, sampler, corpus, observe, capsys):
    from demo.cli import main

    base, spec = sd
    what = NAMES[name][0]
    before = registry_state(populated.root)
    sampler.serving.source.target = populated
    entries = {
        "registry `for_user(user)`": lambda: populated.for_user(name),
        "registry `put(concept=...)`": lambda: populated.for_user("carol").put(random_adapter(spec), base, name),
        "registry `get(user, concept)` (the sampler's AdapterSource)": lambda: populated.get(name, "rex"),
        "sampler `generate(user=...)` with a <mention>": lambda: sampler.generate("a <rex>", user=name, steps=1),
        "training `personalize(user=...)`": lambda: personalize(base, name, "rex", [corpus / "images" / "cmyk.jpg"], "dog", registry=populated, preset="quick", steps=1),
        "training `personalize(concept=...)`": lambda: personalize(base, "carol", name, [corpus / "images" / "cmyk.jpg"], "dog", registry=populated, preset="quick", steps=1),
    }
    for entry, call in entries.items():
        observed = refused(call, InvalidName)
        observe("names", f"{_label(name)}: {what}", entry, "refused: InvalidName naming the name", short(observed))
    if "\x00" not in name:  # the OS refuses NUL in argv before the CLI could see it
        code = main(["registry", "list", name, "--registry", str(populated.root)])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err
        observe("names", f"{_label(name)}: {what}", "CLI `bespoke registry list USER`", "exit 2, one-line error", f"exit {code}: {short(err.strip())}")
    assert registry_state(populated.root) == before


@pytest.mark.parametrize("name", GOOD)
def test_names_in_any_script_are_accepted_and_isolated(name, populated, sd, observe):
    base, spec = sd
    record = populated.for_user(name).put(random_adapter(spec, seed=5), base, name)
    assert (record.user, record.concept) == (name, name)
    assert populated.concepts(name) == [name] and populated.concepts("alice") == ["cat", "rex"]
    observe("names", f"{_label(name)}: {NAMES[name][0]}", "registry `for_user(user).put(concept=...)`", "accepted; isolated from other users", f"stored as v{record.version}; only this user sees it")
