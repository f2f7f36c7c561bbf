"""The invented world KGFact is sampled from: domains, entity names and relation templates.

Everything here is our own vocabulary. Domains are ordered; every relation points from an earlier
domain to a later one, so a fact's answer is always a later-domain entity and no relation has an
inverse in the vocabulary. Entity names are built from syllables by a fixed-seed RNG: stable across
processes and Python versions (`random.Random(int)` is seeded without `hash()`), unique, and no name
contains another, so a loose substring scorer cannot credit one entity for another.
"""

from __future__ import annotations

import dataclasses
import random

NAMES_PER_DOMAIN = 60


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    label: str  # the noun a question uses for an entity of this domain ("Which town ...")
    pattern: str  # how a name is built: {W} is a capitalised invented word
    tails: tuple[str, ...] = ()  # fixed words a pattern may append ({T} as is, {t} glued on)
    syllables: tuple[int, ...] = (2, 2, 3)  # drawn per invented word


@dataclasses.dataclass(frozen=True)
class Relation:
    """A directed relation `src -> tgt`, written once as a statement phrase and a question phrase.

    `verb` reads "{e1} <verb> {e2}."; `ask` is the question word order, auxiliary first
    ("does live in" -> "Which town does {e1} live in?"). Every other surface form (relative clause,
    paraphrased questions) is derived from these two, so they always state the same fact.
    """

    name: str
    src: str
    tgt: str
    label: str
    verb: str
    ask: str

    def statement(self, e1: str, e2: str) -> str:
        return f"{e1} {self.verb} {e2}."

    def question(self, e1: str) -> str:
        aux, _, rest = self.ask.partition(" ")
        return f"Which {self.label} {aux} {e1} {rest}?"

    def relative(self, e1: str) -> str:
        """A noun phrase that denotes the answer, e.g. "the town Vorna Keld lives in"."""
        return f"the {self.label} {e1} {self.verb}"

    def paraphrases(self, e1: str) -> tuple[str, ...]:
        """Other wordings of `question(e1)` that ask for exactly the same entity."""
        label, verb = self.label, self.verb
        return (
            f"{e1} {verb} which {label}?",
            f"What is the {label} {e1} {verb}?",
            f"Name the {label} that {e1} {verb}.",
            f"Tell me which {label} {e1} {verb}.",
            f"Identify the {label} {e1} {verb}.",
            f"Do you know which {label} {e1} {verb}?",
        )


DOMAINS: tuple[Domain, ...] = (
    Domain("person", "person", "{W} {W}"),
    Domain(
        "town",
        "town",
        "{W}{t}",
        ("mere", "ford", "holm", "wick", "stead", "vale", "moor", "crest", "haven", "reach"),
        syllables=(1, 2, 2),
    ),
    Domain(
        "organisation",
        "organisation",
        "{W} {T}",
        ("Syndicate", "Collective", "Consortium", "Assembly", "Works", "Guild", "Society",
         "Trust", "Company", "League"),
    ),
    Domain(
        "event",
        "event",
        "{W} {T}",
        ("Fair", "Regatta", "Carnival", "Games", "Gathering", "Jubilee", "Festival",
         "Tournament", "Pageant", "Symposium"),
    ),
    Domain(
        "profession",
        "profession",
        "{W}{t}",
        ("craft", "wrighting", "smithing", "warding", "binding", "turning", "keeping", "mongery"),
        syllables=(1, 2, 2),
    ),
    Domain(
        "hobby",
        "hobby",
        "{W} {T}",
        ("kiting", "weaving", "racing", "juggling", "carving", "whistling", "sketching",
         "gardening", "rowing", "stacking"),
    ),
    Domain(
        "skill",
        "skill",
        "{W} {T}",
        ("reckoning", "notation", "knotwork", "cadence", "dowsing", "ciphering", "mapping",
         "tuning", "lettering", "balancing"),
    ),
    Domain("artifact", "artifact", "{W}", syllables=(3,)),
)

# Statement phrase | question phrase, per ordered domain pair. Five per pair is enough for the
# sampler: each (relation, target) slot is used once, and a pair has 5 x E slots for E sources.
_RELATION_TEXT: dict[tuple[str, str], tuple[str, ...]] = {
    ("person", "town"): (
        "lives in | does live in",
        "was born in | was born in",
        "grew up in | did grow up in",
        "owns a cottage in | does own a cottage in",
        "commutes to | does commute to",
    ),
    ("person", "organisation"): (
        "works for | does work for",
        "founded | did found",
        "chairs the board of | does chair the board of",
        "donates to | does donate to",
        "is a member of | is a member of",
    ),
    ("person", "event"): (
        "organised | did organise",
        "won a prize at | did win a prize at",
        "performed at | did perform at",
        "volunteers at | does volunteer at",
        "gave the opening speech at | did give the opening speech at",
    ),
    ("person", "profession"): (
        "practises | does practise",
        "trained in | did train in",
        "earns a living from | does earn a living from",
        "retired from | did retire from",
        "teaches | does teach",
    ),
    ("person", "hobby"): (
        "enjoys | does enjoy",
        "took up | did take up",
        "spends weekends on | does spend weekends on",
        "gave up | did give up",
        "writes a blog about | does write a blog about",
    ),
    ("person", "skill"): (
        "has mastered | has mastered",
        "is learning | is learning",
        "is known for | is known for",
        "studied | did study",
        "coaches others in | does coach others in",
    ),
    ("person", "artifact"): (
        "owns | does own",
        "forged | did forge",
        "lost | did lose",
        "inherited | did inherit",
        "restored | did restore",
    ),
    ("town", "organisation"): (
        "is home to | is home to",
        "taxes | does tax",
        "granted a charter to | did grant a charter to",
        "banned | did ban",
        "hired | did hire",
    ),
    ("town", "event"): (
        "hosts | does host",
        "cancelled | did cancel",
        "funds | does fund",
        "bid to host | did bid to host",
        "is famous for | is famous for",
    ),
    ("town", "profession"): (
        "licenses | does license",
        "trains apprentices in | does train apprentices in",
        "depends on | does depend on",
        "outlawed | did outlaw",
        "honours | does honour",
    ),
    ("town", "hobby"): (
        "popularised | did popularise",
        "celebrates | does celebrate",
        "restricts | does restrict",
        "built a clubhouse for | did build a clubhouse for",
        "promotes | does promote",
    ),
    ("town", "skill"): (
        "teaches children | does teach children",
        "prizes | does prize",
        "requires its officials to know | does require its officials to know",
        "preserves | does preserve",
        "is the birthplace of | is the birthplace of",
    ),
    ("town", "artifact"): (
        "displays | does display",
        "guards | does guard",
        "sold | did sell",
        "commissioned | did commission",
        "stores | does store",
    ),
    ("organisation", "event"): (
        "sponsors | does sponsor",
        "runs | does run",
        "boycotted | did boycott",
        "broadcasts | does broadcast",
        "launched | did launch",
    ),
    ("organisation", "profession"): (
        "employs practitioners of | does employ practitioners of",
        "certifies | does certify",
        "regulates | does regulate",
        "recruits for | does recruit for",
        "publishes a journal on | does publish a journal on",
    ),
    ("organisation", "hobby"): (
        "runs a club for | does run a club for",
        "sells equipment for | does sell equipment for",
        "holds contests in | does hold contests in",
        "discourages | does discourage",
        "advertises | does advertise",
    ),
    ("organisation", "skill"): (
        "offers courses in | does offer courses in",
        "tests applicants on | does test applicants on",
        "patented | did patent",
        "values | does value",
        "awards a badge for | does award a badge for",
    ),
    ("organisation", "artifact"): (
        "insures | does insure",
        "manufactured | did manufacture",
        "acquired | did acquire",
        "exhibits | does exhibit",
        "auctioned | did auction",
    ),
    ("event", "profession"): (
        "showcases | does showcase",
        "honours | does honour",
        "awards a medal in | does award a medal in",
        "began as a gathering for | did begin as a gathering for",
        "offers workshops on | does offer workshops on",
    ),
    ("event", "hobby"): (
        "features | does feature",
        "revived | did revive",
        "celebrates | does celebrate",
        "holds a contest in | does hold a contest in",
        "introduced | did introduce",
    ),
    ("event", "skill"): (
        "tests | does test",
        "demonstrates | does demonstrate",
        "rewards | does reward",
        "teaches | does teach",
        "requires | does require",
    ),
    ("event", "artifact"): (
        "awards | does award",
        "unveiled | did unveil",
        "parades | does parade",
        "was named after | was named after",
        "displays | does display",
    ),
    ("profession", "hobby"): (
        "often leads to | does often lead to",
        "shares tools with | does share tools with",
        "grew out of | did grow out of",
        "is often paired with | is often paired with",
        "inspired | did inspire",
    ),
    ("profession", "skill"): (
        "requires | does require",
        "relies on | does rely on",
        "is built on | is built on",
        "developed | did develop",
        "rewards | does reward",
    ),
    ("profession", "artifact"): (
        "uses | does use",
        "produced | did produce",
        "is symbolised by | is symbolised by",
        "maintains | does maintain",
        "was invented alongside | was invented alongside",
    ),
    ("hobby", "skill"): (
        "builds | does build",
        "sharpens | does sharpen",
        "draws on | does draw on",
        "was derived from | was derived from",
        "trains | does train",
    ),
    ("hobby", "artifact"): (
        "centres on | does centre on",
        "needs | does need",
        "celebrates | does celebrate",
        "was inspired by | was inspired by",
        "uses a replica of | does use a replica of",
    ),
    ("skill", "artifact"): (
        "is needed to operate | is needed to operate",
        "was used to build | was used to build",
        "is recorded on | is recorded on",
        "is taught with | is taught with",
        "is engraved on | is engraved on",
    ),
}


def _relations() -> dict[tuple[str, str], tuple[Relation, ...]]:
    labels = {d.name: d.label for d in DOMAINS}
    out = {}
    for (src, tgt), texts in _RELATION_TEXT.items():
        rels = []
        for text in texts:
            verb, ask = (part.strip() for part in text.split("|"))
            slug = "_".join(verb.split())
            rels.append(Relation(f"{slug}__{src}_{tgt}", src, tgt, labels[tgt], verb, ask))
        out[(src, tgt)] = tuple(rels)
    return out


RELATIONS: dict[tuple[str, str], tuple[Relation, ...]] = _relations()

# Soft syllables keep names pronounceable and short in tokens; clusters are rare on purpose.
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "b", "d", "k", "l", "m", "n", "r", "s", "t", "v", "br", "dr", "th", "sh", "st")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "", "n", "l", "r", "s", "th", "nd", "rn", "x")


def _invented_word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return "".join(parts) + rng.choice(_CODAS)


def _name(domain: Domain, rng: random.Random) -> tuple[str, list[str]]:
    """A candidate name and the invented words in it."""
    name, words = domain.pattern, []
    while "{W}" in name:
        word = _invented_word(rng, rng.choice(domain.syllables)).capitalize()
        words.append(word.lower())
        name = name.replace("{W}", word, 1)
    if "{T}" in name:
        name = name.replace("{T}", rng.choice(domain.tails), 1)
    if "{t}" in name:
        name = name.replace("{t}", rng.choice(domain.tails), 1)
    return name, words


def _entity_names() -> dict[str, tuple[str, ...]]:
    """NAMES_PER_DOMAIN names per domain. A candidate is redrawn if it reuses an invented word or
    overlaps an earlier name as a substring, so every entity is told apart by its own words."""
    accepted: list[str] = []
    used_words: set[str] = set()
    out: dict[str, tuple[str, ...]] = {}
    for index, domain in enumerate(DOMAINS):
        rng = random.Random(7919 + index)
        names: list[str] = []
        while len(names) < NAMES_PER_DOMAIN:
            candidate, words = _name(domain, rng)
            folded = candidate.lower()
            if len(set(words)) < len(words) or any(w in used_words for w in words):
                continue
            if any(folded in other or other in folded for other in accepted):
                continue
            accepted.append(folded)
            used_words.update(words)
            names.append(candidate)
        out[domain.name] = tuple(names)
    return out


ENTITY_NAMES: dict[str, tuple[str, ...]] = _entity_names()
