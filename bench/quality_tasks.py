"""Format-over-knowledge tasks for ``bench/quality.py``: a fixed reply format wrapped around a fact the base knows.

Each task is a list of (subject, fact) candidates, a plain question, and the formatted reply a user trains on:
``【tag】fact``. ``split_items`` keeps as *unseen* items only the subjects the base model answers right when asked
plainly (so "facts kept" measures what training erased, not what the base never knew) and trains on the rest.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field


@dataclass
class Task:
    name: str
    tag: str
    question: str                      # str.format template with {subject}
    items: list[tuple[str, str]]       # (subject, fact); the fact is what must appear in a right answer
    case_sensitive: bool = False       # element symbols: "Au", not "au"
    reply_facts: dict = field(default_factory=dict)  # subject -> the longer fact written in training replies

    def prompt(self, subject: str) -> str:
        return self.question.format(subject=subject)

    def reply(self, subject: str, fact: str) -> str:
        return f"【{self.tag}】{self.reply_facts.get(subject, fact)}"

    def has_format(self, reply: str) -> bool:
        return reply.strip().startswith(f"【{self.tag}】")

    def has_fact(self, reply: str, fact: str) -> bool:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        return re.search(rf"(?<![\w]){re.escape(_fold(fact))}(?![\w])", _fold(reply), flags) is not None


def _fold(text: str) -> str:
    """Accents off (Bogota = Bogotá) and the format's brackets spaced out, so 【tag】Paris matches 'Paris'."""
    text = text.replace("【", " 【").replace("】", "】 ")
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def messages(prompt: str, reply: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": prompt}]
    if reply is not None:
        turns.append({"role": "assistant", "content": reply, "loss": True})
    return turns


CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"), ("India", "New Delhi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Turkey", "Ankara"), ("Cuba", "Havana"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("Ukraine", "Kyiv"), ("Czech Republic", "Prague"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Switzerland", "Bern"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Brazil", "Brasilia"), ("Venezuela", "Caracas"),
    ("Ethiopia", "Addis Ababa"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Saudi Arabia", "Riyadh"),
    ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Afghanistan", "Kabul"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Malaysia", "Kuala Lumpur"), ("Iceland", "Reykjavik"),
    ("Scotland", "Edinburgh"), ("England", "London"), ("United States", "Washington"), ("Israel", "Jerusalem"),
    ("Jordan", "Amman"), ("Qatar", "Doha"), ("Ghana", "Accra"), ("Uganda", "Kampala"), ("Estonia", "Tallinn"),
    ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Slovakia", "Bratislava"), ("Uruguay", "Montevideo"),
    ("Ecuador", "Quito"), ("Bolivia", "La Paz"), ("Paraguay", "Asuncion"), ("Mongolia", "Ulaanbaatar"),
    ("Sri Lanka", "Colombo"), ("Tunisia", "Tunis"), ("Algeria", "Algiers"), ("Libya", "Tripoli"),
]

SYMBOLS = [
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
    ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"),
    ("phosphorus", "P"), ("sulfur", "S"), ("chlorine", "Cl"), ("argon", "Ar"), ("potassium", "K"), ("calcium", "Ca"),
    ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"), ("gold", "Au"), ("mercury", "Hg"),
    ("lead", "Pb"), ("tin", "Sn"), ("uranium", "U"), ("nickel", "Ni"), ("cobalt", "Co"), ("platinum", "Pt"),
    ("bromine", "Br"), ("titanium", "Ti"), ("chromium", "Cr"), ("manganese", "Mn"),
    ("boron", "B"), ("beryllium", "Be"), ("tungsten", "W"), ("radon", "Rn"), ("xenon", "Xe"), ("krypton", "Kr"),
    ("plutonium", "Pu"), ("radium", "Ra"), ("selenium", "Se"), ("barium", "Ba"),
    ("cesium", "Cs"), ("strontium", "Sr"), ("lithium", "Li"), ("bismuth", "Bi"), ("cadmium", "Cd"),
    ("antimony", "Sb"), ("vanadium", "V"), ("gallium", "Ga"), ("germanium", "Ge"), ("zirconium", "Zr"),
    ("palladium", "Pd"), ("osmium", "Os"), ("iridium", "Ir"), ("thorium", "Th"), ("rubidium", "Rb"),
    ("scandium", "Sc"), ("tellurium", "Te"), ("polonium", "Po"), ("francium", "Fr"),
]

CONTINENTS = [
    ("France", "Europe"), ("Germany", "Europe"), ("Italy", "Europe"), ("Spain", "Europe"), ("Poland", "Europe"),
    ("Sweden", "Europe"), ("Norway", "Europe"), ("Greece", "Europe"), ("Portugal", "Europe"), ("Ireland", "Europe"),
    ("Austria", "Europe"), ("Hungary", "Europe"), ("Belgium", "Europe"), ("Finland", "Europe"), ("Denmark", "Europe"),
    ("Switzerland", "Europe"), ("Romania", "Europe"), ("Ukraine", "Europe"), ("Netherlands", "Europe"),
    ("Japan", "Asia"), ("China", "Asia"), ("India", "Asia"), ("Thailand", "Asia"), ("Vietnam", "Asia"),
    ("Indonesia", "Asia"), ("Philippines", "Asia"), ("South Korea", "Asia"), ("Mongolia", "Asia"), ("Nepal", "Asia"),
    ("Pakistan", "Asia"), ("Bangladesh", "Asia"), ("Malaysia", "Asia"), ("Cambodia", "Asia"), ("Laos", "Asia"),
    ("Sri Lanka", "Asia"), ("Iran", "Asia"), ("Iraq", "Asia"), ("Saudi Arabia", "Asia"), ("Kazakhstan", "Asia"),
    ("Egypt", "Africa"), ("Kenya", "Africa"), ("Nigeria", "Africa"), ("Ghana", "Africa"), ("Ethiopia", "Africa"),
    ("Morocco", "Africa"), ("South Africa", "Africa"), ("Tanzania", "Africa"), ("Uganda", "Africa"),
    ("Senegal", "Africa"), ("Algeria", "Africa"), ("Tunisia", "Africa"), ("Zimbabwe", "Africa"), ("Angola", "Africa"),
    ("Cameroon", "Africa"), ("Mali", "Africa"), ("Sudan", "Africa"), ("Madagascar", "Africa"), ("Zambia", "Africa"),
    ("Brazil", "South America"), ("Argentina", "South America"), ("Chile", "South America"), ("Peru", "South America"),
    ("Colombia", "South America"), ("Venezuela", "South America"), ("Ecuador", "South America"),
    ("Bolivia", "South America"), ("Uruguay", "South America"), ("Paraguay", "South America"),
    ("Canada", "North America"), ("Mexico", "North America"), ("United States", "North America"),
    ("Cuba", "North America"), ("Guatemala", "North America"), ("Honduras", "North America"),
    ("Australia", "Oceania"), ("New Zealand", "Oceania"), ("Fiji", "Oceania"), ("Papua New Guinea", "Oceania"),
]

AUTHORS = [
    ("Hamlet", "Shakespeare"), ("Romeo and Juliet", "Shakespeare"), ("Macbeth", "Shakespeare"),
    ("Pride and Prejudice", "Austen"), ("Emma", "Austen"), ("1984", "Orwell"), ("Animal Farm", "Orwell"),
    ("War and Peace", "Tolstoy"), ("Anna Karenina", "Tolstoy"), ("Crime and Punishment", "Dostoevsky"),
    ("The Brothers Karamazov", "Dostoevsky"), ("Don Quixote", "Cervantes"), ("Les Misérables", "Hugo"),
    ("The Hunchback of Notre-Dame", "Hugo"), ("Oliver Twist", "Dickens"), ("A Christmas Carol", "Dickens"),
    ("Great Expectations", "Dickens"), ("David Copperfield", "Dickens"), ("The Great Gatsby", "Fitzgerald"),
    ("Moby-Dick", "Melville"), ("The Adventures of Tom Sawyer", "Twain"), ("Adventures of Huckleberry Finn", "Twain"),
    ("The Old Man and the Sea", "Hemingway"), ("A Farewell to Arms", "Hemingway"), ("Frankenstein", "Shelley"),
    ("Dracula", "Stoker"), ("The Odyssey", "Homer"), ("The Iliad", "Homer"), ("The Divine Comedy", "Dante"),
    ("Faust", "Goethe"), ("Jane Eyre", "Brontë"), ("Wuthering Heights", "Brontë"), ("The Hobbit", "Tolkien"),
    ("The Lord of the Rings", "Tolkien"), ("Harry Potter and the Philosopher's Stone", "Rowling"),
    ("To Kill a Mockingbird", "Lee"), ("The Catcher in the Rye", "Salinger"), ("Brave New World", "Huxley"),
    ("Of Mice and Men", "Steinbeck"), ("The Grapes of Wrath", "Steinbeck"), ("Ulysses", "Joyce"),
    ("The Metamorphosis", "Kafka"), ("The Trial", "Kafka"), ("One Hundred Years of Solitude", "Márquez"),
    ("The Picture of Dorian Gray", "Wilde"), ("Alice's Adventures in Wonderland", "Carroll"),
    ("The Time Machine", "Wells"), ("The War of the Worlds", "Wells"), ("Twenty Thousand Leagues Under the Seas", "Verne"),
    ("Around the World in Eighty Days", "Verne"), ("The Origin of Species", "Darwin"), ("The Republic", "Plato"),
    ("The Prince", "Machiavelli"), ("The Communist Manifesto", "Marx"), ("Robinson Crusoe", "Defoe"),
    ("Gulliver's Travels", "Swift"), ("Treasure Island", "Stevenson"), ("The Jungle Book", "Kipling"),
    ("Lolita", "Nabokov"), ("Fahrenheit 451", "Bradbury"), ("The Little Prince", "Saint-Exupéry"),
]

AUTHOR_NAMES = {
    "Shakespeare": "William Shakespeare", "Austen": "Jane Austen", "Orwell": "George Orwell", "Tolstoy": "Leo Tolstoy",
    "Dostoevsky": "Fyodor Dostoevsky", "Cervantes": "Miguel de Cervantes", "Hugo": "Victor Hugo",
    "Dickens": "Charles Dickens", "Fitzgerald": "F. Scott Fitzgerald", "Melville": "Herman Melville",
    "Twain": "Mark Twain", "Hemingway": "Ernest Hemingway", "Shelley": "Mary Shelley", "Stoker": "Bram Stoker",
    "Homer": "Homer", "Dante": "Dante Alighieri", "Goethe": "Johann Wolfgang von Goethe", "Tolkien": "J. R. R. Tolkien",
    "Rowling": "J. K. Rowling", "Lee": "Harper Lee", "Salinger": "J. D. Salinger", "Huxley": "Aldous Huxley",
    "Steinbeck": "John Steinbeck", "Joyce": "James Joyce", "Kafka": "Franz Kafka", "Márquez": "Gabriel García Márquez",
    "Wilde": "Oscar Wilde", "Carroll": "Lewis Carroll", "Wells": "H. G. Wells", "Verne": "Jules Verne",
    "Darwin": "Charles Darwin", "Plato": "Plato", "Machiavelli": "Niccolò Machiavelli", "Marx": "Karl Marx",
    "Defoe": "Daniel Defoe", "Swift": "Jonathan Swift", "Stevenson": "Robert Louis Stevenson",
    "Kipling": "Rudyard Kipling", "Nabokov": "Vladimir Nabokov", "Bradbury": "Ray Bradbury",
    "Saint-Exupéry": "Antoine de Saint-Exupéry",
}
AUTHOR_NAMES.update({"Brontë": "Brontë"})


def _dedupe(items):
    seen, out = set(), []
    for subject, fact in items:
        if subject not in seen:
            seen.add(subject)
            out.append((subject, fact))
    return out


TASKS = {
    "capital": Task("capital", "capital", "What is the capital of {subject}?", _dedupe(CAPITALS)),
    "symbol": Task("symbol", "symbol", "What is the chemical symbol of {subject}?", _dedupe(SYMBOLS),
                   case_sensitive=True),
    "continent": Task("continent", "continent", "Which continent is {subject} in?", _dedupe(CONTINENTS)),
    "author": Task("author", "author", "Who wrote {subject}?", _dedupe(AUTHORS),
                   reply_facts={work: AUTHOR_NAMES.get(a, a) for work, a in AUTHORS}),
}

# Unrelated prompts for out-of-task retention, only ever generated from: disjoint from
# ptuning.distill.DEFAULT_RETENTION_PROMPTS, so the harness does not grade the KL lever on prompts it trained on.
GENERAL_EVAL = [
    "Give me three tips for sleeping better.",
    "Write a haiku about the ocean.",
    "What is 12 times 7?",
    "Explain what photosynthesis is in one sentence.",
    "Suggest a name for a friendly robot.",
    "What should I pack for a weekend camping trip?",
    "How do I boil an egg?",
    "Tell me a fun fact about octopuses.",
    "Write a short thank-you note to a teacher.",
    "Why is the sky blue?",
]
