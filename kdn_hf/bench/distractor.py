"""The ``distractor`` workload: look-alike facts across the documents of one prompt.

Every prompt holds ``k`` documents about different made-up entities of one kind
(stadiums, ships, companies, festivals, observatories), each stating facts in the
same roles (capacity, founder, city, year, ...) with different values, and a
question whose answer sits in exactly one of them ("How many spectators does
Aldermoor Stadium hold?"). A method that blurs which document a fact came from
answers with another document's value. Facts are often stated with "it" or
"the stadium", so the title (the document's first line) is what ties them to
their entity.

All text is generated here from templates and made-up names (CC0, no source
data): deterministic, with disjoint entities for the ``dev`` split (tuning) and
the ``test`` split (reporting). Cases are :class:`~kdn_hf.bench.workload.RagCase`
objects, so ``kdn bench --workload distractor`` times and scores them like the
rag workload.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kdn_hf.bench.workload import RagCase, chat_format
from kdn_hf.errors import ConfigError

SPLITS = ("dev", "test")
#: prompts (one question each) per split
QUESTIONS_PER_SPLIT = 40
#: one RNG for every split, dev drawn first: names never repeat across splits
_SEED = 13

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th",
           "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "n", "r", "l", "m", "s", "th", "nd", "rk", "ld")
_PLACE_ENDS = ("ford", "moor", "ton", "bury", "wick", "dale", "field", "haven", "mouth", "stead")
_FIRST = ("Anna", "Boris", "Clara", "Daniel", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Karla", "Leon",
          "Marta", "Nils", "Olga", "Pavel", "Rosa", "Simon", "Tilda", "Victor", "Wanda", "Yusuf", "Zora", "Mira")

# Each kind: title, the document's first sentence, the roles (value maker, fact sentences, question, answer
# forms), and filler sentences that state nothing a question asks. {n} is the entity's name, {it} the
# phrase used for it in the fact sentences ("It" / "The stadium").


def _num(lo: int, hi: int, step: int):
    return lambda r: r.randrange(lo, hi, step)


def _fmt(v: int) -> str:
    return f"{v:,}"


@dataclass(frozen=True)
class _Role:
    name: str
    value: object  # callable(rng, names) -> str
    facts: tuple[str, ...]  # sentence templates with {n}, {it}, {v}
    question: str  # with {n}
    forms: object = None  # callable(str) -> tuple of accepted answers (default: the value itself)


def _numeric(v: str) -> tuple[str, ...]:
    return (v, v.replace(",", ""))


def _person(v: str) -> tuple[str, ...]:
    return (v, v.split()[-1])  # the surname alone counts too (made-up, so it names one person)


_KINDS = {
    "stadium": dict(
        title="{n} Stadium", it="The stadium",
        first="{n} Stadium is a sports ground used mostly for football matches.",
        roles=(
            _Role("capacity", lambda r, g: _fmt(r.randrange(6000, 62000, 100)) + " spectators",
                  ("{it} holds {v}.", "Today {n} Stadium can seat {v}."),
                  "How many spectators does {n} Stadium hold?", lambda v: _numeric(v.split()[0])),
            _Role("city", lambda r, g: g.place(),
                  ("{it} stands on the eastern edge of {v}.", "{n} Stadium is located in the town of {v}."),
                  "In which town is {n} Stadium located?"),
            _Role("opened", lambda r, g: str(r.randrange(1890, 2015)),
                  ("{it} was opened in {v}.", "The first match at {n} Stadium was played in {v}."),
                  "In which year was {n} Stadium opened?"),
            _Role("architect", lambda r, g: g.person(),
                  ("{it} was designed by the architect {v}.", "The architect of {n} Stadium was {v}."),
                  "Who designed {n} Stadium?", _person),
            _Role("team", lambda r, g: g.word() + " Rovers",
                  ("{it} is the home ground of {v}.", "The club {v} plays its home games at {n} Stadium."),
                  "Which club plays its home games at {n} Stadium?"),
        ),
        filler=("The pitch is maintained by a small team of groundskeepers.",
                "On match days the surrounding streets fill with supporters long before kick-off.",
                "The main stand has a roof that keeps most of the crowd dry.",
                "Floodlights were added to allow evening games in the winter months.",
                "Local schools sometimes hold their sports days on the grounds.",
                "A small museum inside the main stand displays old shirts and photographs.",
                "The ground has been renovated several times over the decades.",
                "Tickets are sold at a booth next to the northern gate.",
                "Concerts have occasionally been held there during the summer break.",
                "The changing rooms were rebuilt after a fire damaged the old ones.",
                "Supporters of the visiting side are seated in the southern corner.",
                "A bus line connects the ground with the town centre.")),
    "ship": dict(
        title="The {n}", it="The ship",
        first="The {n} is a research vessel that studies the cold northern seas.",
        roles=(
            _Role("length", lambda r, g: str(r.randrange(40, 190)) + " metres",
                  ("{it} is {v} long.", "From bow to stern the {n} measures {v}."),
                  "How long is the {n}?", lambda v: (v.split()[0] + " metres", v.split()[0] + " m")),
            _Role("port", lambda r, g: g.place(),
                  ("{it} sails from its home port of {v}.", "The home port of the {n} is {v}."),
                  "What is the home port of the {n}?"),
            _Role("launched", lambda r, g: str(r.randrange(1950, 2020)),
                  ("{it} was launched in {v}.", "The {n} first went to sea in {v}."),
                  "In which year was the {n} launched?"),
            _Role("captain", lambda r, g: g.person(),
                  ("{it} is commanded by captain {v}.", "The captain of the {n} is {v}."),
                  "Who is the captain of the {n}?", _person),
            _Role("crew", lambda r, g: str(r.randrange(12, 240)) + " sailors",
                  ("{it} carries a crew of {v}.", "On long voyages the {n} has {v} aboard."),
                  "How many sailors does the crew of the {n} have?", lambda v: (v.split()[0],)),
        ),
        filler=("The laboratories on board can be rearranged for each expedition.",
                "Storms in the autumn often force the crew to change course.",
                "Scientists from several universities take turns on the voyages.",
                "The galley serves hot meals at any hour of the day.",
                "A small helicopter deck was added during a later refit.",
                "Samples of sea water are frozen and shipped to land for study.",
                "Whales are sometimes seen following the wake at dawn.",
                "The hull is painted red so that it can be spotted in the ice.",
                "Radio contact with the coast is kept twice a day.",
                "Young researchers often describe their first voyage as unforgettable.",
                "The engines were replaced with quieter ones to disturb marine life less.",
                "A library of charts and logbooks is kept on the bridge deck.")),
    "company": dict(
        title="{n} Industries", it="The company",
        first="{n} Industries is a manufacturer of household machines.",
        roles=(
            _Role("employees", lambda r, g: _fmt(r.randrange(300, 48000, 10)) + " people",
                  ("{it} employs {v}.", "{n} Industries has a workforce of {v}."),
                  "How many people does {n} Industries employ?", lambda v: _numeric(v.split()[0])),
            _Role("hq", lambda r, g: g.place(),
                  ("{it} has its headquarters in {v}.", "The head office of {n} Industries is in {v}."),
                  "Where does {n} Industries have its headquarters?"),
            _Role("founded", lambda r, g: str(r.randrange(1850, 2010)),
                  ("{it} was founded in {v}.", "{n} Industries began trading in {v}."),
                  "In which year was {n} Industries founded?"),
            _Role("founder", lambda r, g: g.person(),
                  ("{it} was started by the engineer {v}.", "The founder of {n} Industries was {v}."),
                  "Who founded {n} Industries?", _person),
            _Role("product", lambda r, g: r.choice(("washing machines", "sewing machines", "vacuum cleaners",
                                                    "coffee grinders", "bread ovens", "ceiling fans",
                                                    "electric kettles", "typewriters")),
                  ("{it} is best known for its {v}.", "The best-known products of {n} Industries are {v}."),
                  "What is {n} Industries best known for?"),
        ),
        filler=("The firm publishes a short report on its work every spring.",
                "Its machines are repaired in workshops across the region.",
                "Apprentices spend two years in the workshops before they join a team.",
                "The design office is known for its plain and sturdy style.",
                "Several of its early models are now kept by collectors.",
                "The company sponsors a football club for its workers.",
                "Its delivery vans are painted in a dark green colour.",
                "A canteen on the factory floor serves lunch to every shift.",
                "Sales rose steadily after a new line of models was introduced.",
                "The board meets four times a year to review the accounts.",
                "Most parts are made in-house rather than bought from suppliers.",
                "A training centre teaches customers how to care for their machines.")),
    "festival": dict(
        title="{n} Festival", it="The festival",
        first="{n} Festival is a yearly celebration of folk music and dance.",
        roles=(
            _Role("visitors", lambda r, g: _fmt(r.randrange(2000, 90000, 100)) + " visitors",
                  ("{it} draws about {v} each year.", "Around {v} come to {n} Festival every year."),
                  "How many visitors does {n} Festival draw each year?", lambda v: _numeric(v.split()[0])),
            _Role("town", lambda r, g: g.place(),
                  ("{it} takes place in the old market square of {v}.", "{n} Festival is held in {v}."),
                  "In which town is {n} Festival held?"),
            _Role("first", lambda r, g: str(r.randrange(1900, 2015)),
                  ("{it} was first held in {v}.", "The first edition of {n} Festival took place in {v}."),
                  "In which year was {n} Festival first held?"),
            _Role("founder", lambda r, g: g.person(),
                  ("{it} was started by the fiddler {v}.", "{n} Festival was founded by {v}."),
                  "Who founded {n} Festival?", _person),
            _Role("month", lambda r, g: r.choice(("January", "March", "April", "May", "June", "July", "August",
                                                  "September", "October", "November")),
                  ("{it} is held every {v}.", "Each year {n} Festival opens in {v}."),
                  "In which month is {n} Festival held?"),
        ),
        filler=("Musicians travel from distant villages to play on its small stages.",
                "Food stalls line the streets and sell bread, soup and sweets.",
                "Children learn the old dances in workshops held in the mornings.",
                "Volunteers put up the tents and take them down again afterwards.",
                "Local inns are usually fully booked during the festival days.",
                "A parade opens the celebrations on the first evening.",
                "The organisers keep ticket prices low so that families can come.",
                "Recordings of the concerts are kept in the town library.",
                "Rain rarely stops the dancing, which simply moves indoors.",
                "Craftspeople sell instruments, baskets and woven cloth.",
                "The closing concert usually ends long after midnight.",
                "Many visitors camp in the meadows just outside the town.")),
    "observatory": dict(
        title="{n} Observatory", it="The observatory",
        first="{n} Observatory is an astronomical observatory run by a group of universities.",
        roles=(
            _Role("altitude", lambda r, g: _fmt(r.randrange(300, 4800, 10)) + " metres",
                  ("{it} sits at an altitude of {v}.", "{n} Observatory lies {v} above sea level."),
                  "At what altitude does {n} Observatory sit?", lambda v: _numeric(v.split()[0])),
            _Role("near", lambda r, g: g.place(),
                  ("{it} is on a hill above the village of {v}.", "The nearest village to {n} Observatory is {v}."),
                  "Which village lies nearest to {n} Observatory?"),
            _Role("built", lambda r, g: str(r.randrange(1880, 2015)),
                  ("{it} was completed in {v}.", "Construction of {n} Observatory ended in {v}."),
                  "In which year was {n} Observatory completed?"),
            _Role("director", lambda r, g: g.person(),
                  ("{it} is directed by the astronomer {v}.", "The director of {n} Observatory is {v}."),
                  "Who is the director of {n} Observatory?", _person),
            _Role("telescopes", lambda r, g: str(r.randrange(2, 40)) + " telescopes",
                  ("{it} operates {v}.", "{n} Observatory has {v} in use."),
                  "How many telescopes does {n} Observatory operate?", lambda v: (v.split()[0],)),
        ),
        filler=("Clear nights are most common in the dry months of the year.",
                "Students spend long nights there learning to take measurements.",
                "The road to the domes is closed when snow falls.",
                "A visitor centre explains the work of the astronomers.",
                "Lights in the valley below are dimmed to keep the sky dark.",
                "Data from the instruments is sent to universities every morning.",
                "Old photographic plates are stored in a cool basement archive.",
                "The domes are opened only after the sun has set.",
                "Researchers from abroad can apply for observing time each year.",
                "Weather stations around the site record wind and humidity.",
                "A small guest house offers rooms to visiting scientists.",
                "Public viewing nights are held once a month in the summer.")),
}
KINDS = tuple(_KINDS)

#: generic filler for any kind (nothing a question asks)
_FILLER = ("Over the years it has appeared in many travel guides of the region.",
           "Local newspapers report on it regularly.",
           "Its history has been written down in a short book by a retired teacher.",
           "The surrounding countryside is known for its orchards and low hills.",
           "Many people in the region have a story to tell about it.",
           "Photographs of it are often printed on postcards.",
           "A small association of friends raises money for its upkeep.",
           "In winter the area around it is much quieter.",
           "Plans for further improvements are discussed every few years.",
           "Guided tours are offered on weekends for a small fee.",
           "Visitors are asked to respect the quiet of the neighbours.",
           "Volunteers lead walks through the area on summer evenings.",
           "A small cafe nearby serves tea and cake to passers-by.",
           "The local council has listed it as a place of interest.",
           "Schoolchildren visit it on trips at least once a year.",
           "A painting of it hangs in the town hall.")


class _Names:
    """Made-up, never repeated names from one seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng
        self.used: set[str] = set()

    def _fresh(self, make) -> str:
        while True:
            s = make()
            if s not in self.used:
                self.used.add(s)
                return s

    def _syl(self) -> str:
        r = self.r
        return r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)

    def word(self) -> str:
        return self._fresh(lambda: (self._syl() + self._syl()).capitalize())

    def place(self) -> str:
        return self._fresh(lambda: (self._syl() + self.r.choice(_PLACE_ENDS)).capitalize())

    def person(self) -> str:
        return self._fresh(lambda: self.r.choice(_FIRST) + " " + (self._syl() + self._syl() + "er").capitalize())


@dataclass(frozen=True)
class DistractorDoc:
    """One generated document: its entity's name, text and the value of each role."""

    kind: str
    name: str
    text: str
    values: dict


@dataclass(frozen=True)
class DistractorQuestion:
    """A question about ``docs[gold]`` of its group (the other documents hold look-alike values)."""

    qid: str
    docs: tuple[DistractorDoc, ...]
    gold: int
    role: str
    question: str
    answers: tuple[str, ...]


def _document(kind: str, rng: random.Random, names: _Names, values: dict) -> DistractorDoc:
    spec = _KINDS[kind]
    name = names.word()
    facts = []
    for role in spec["roles"]:
        template = rng.choice(role.facts)
        it = spec["it"] if rng.random() < 0.5 else "It"
        facts.append(template.format(n=name, it=it, v=values[role.name]))
    filler = list(spec["filler"]) + list(_FILLER)
    rng.shuffle(filler)
    filler = filler[: rng.randrange(20, 27)]
    body = facts + filler
    rng.shuffle(body)
    paragraphs = [" ".join(body[i:i + 4]) for i in range(0, len(body), 4)]
    text = "\n".join([spec["title"].format(n=name), spec["first"].format(n=name), *paragraphs])
    return DistractorDoc(kind, name, text, dict(values))


def generate(split: str = "dev", k: int = 4, questions: int = QUESTIONS_PER_SPLIT) -> list[DistractorQuestion]:
    """The questions of ``split`` ("dev" or "test"), each with ``k`` documents of one kind whose values
    differ in every role (the answer occurs in the gold document only). Deterministic; the two splits
    share no entity, person or place names."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if not 2 <= k <= 8:
        raise ConfigError(f"k (documents per prompt) must lie in [2, 8] for the distractor workload, got {k}")
    rng = random.Random(_SEED)
    names = _Names(rng)
    out: dict[str, list[DistractorQuestion]] = {}
    for s in SPLITS:  # dev first, then test, from the same RNG: the test split's names are new
        qs = []
        for n in range(questions):
            kind = KINDS[n % len(KINDS)]
            roles = _KINDS[kind]["roles"]
            per_doc: list[dict] = [{} for _ in range(k)]
            for role in roles:
                seen: set[str] = set()
                for d in range(k):
                    v = role.value(rng, names)
                    while v in seen:
                        v = role.value(rng, names)
                    seen.add(v)
                    per_doc[d][role.name] = v
            docs = tuple(_document(kind, rng, names, per_doc[d]) for d in range(k))
            gold = n % k
            role = roles[(n // len(KINDS)) % len(roles)]
            v = docs[gold].values[role.name]
            answers = tuple(dict.fromkeys(role.forms(v) if role.forms else (v,)))
            qs.append(DistractorQuestion(f"distractor-{s}-{n:03d}", docs, gold, role.name,
                                         role.question.format(n=docs[gold].name), answers))
        out[s] = qs
    return out[split]


def distractor_cases(tokenizer, k: int = 4, doc_tokens: int | None = None, limit: int | None = None,
                     split: str = "dev") -> list[RagCase]:
    """The distractor requests of ``split`` as :class:`RagCase` objects ([system, doc_1..doc_k, question];
    kind "distractor", ``gold_index`` the document holding the answer). ``doc_tokens`` cuts each
    document (None: whole, ~300-500 tokens); questions whose answer falls past the cut are left out."""
    enc = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])
    sep = enc("\n\n")
    system_text, question_format = chat_format(tokenizer)
    system = enc(system_text)
    cases = []
    for q in generate(split, k=k):
        chunks = []
        for d in q.docs:
            ids = enc(d.text)
            if doc_tokens is not None:
                ids = ids[:doc_tokens]
            chunks.append(ids + sep)
        gold_text = tokenizer.decode(chunks[q.gold])
        if not any(a in gold_text for a in q.answers):
            continue
        question = enc(question_format.format(question=q.question))
        cases.append(RagCase(q.qid, (system, *chunks, question), q.answers, "distractor", q.gold))
    return cases[:limit] if limit is not None else cases
