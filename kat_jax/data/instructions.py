"""Instruction following with checkable constraints: generated (instruction, compliant answer)
pairs, and a code verifier for every constraint category.

A category (``CATEGORIES``, by name) is a kind of verifiable instruction — an output format (JSON
object, keys, array; markdown bullets, numbered lists, tables, headings, a code block), a length
limit (words, sentences, characters, lines, paragraphs), words required, forbidden or repeated,
the language of the answer (French, German, Spanish, told apart by marker words), letter case,
a prefix or suffix, a postscript, placeholders, wrapping (quotes, tags), punctuation. Each has
``draw`` (its parameters, JSON data), ``describe`` (the instruction sentence), ``check`` (the
verifier: a pure function of the answer text), ``comply`` (turns a draft answer into one that
satisfies it) and ``violate`` (a minimal edit of a compliant answer that breaks exactly this
constraint: negative examples, and the tests' proof that the verifier rejects)::

    example = make_example(np.random.default_rng(0), categories=["bullet_count", "lowercase"])
    example.prompt, example.answer        # the request with its instructions; a compliant answer
    verify(example.answer, example.constraints)     # {"bullet_count": True, "lowercase": True}
    conversation = example.conversation()           # user / assistant, for SFT (data.chat)
    examples = make_examples(seed=0, num_examples=500, max_constraints=2)

Answers are templated from a small bank of programming topics (and of French, German and
Spanish sentences); every example is kept only if every verifier accepts it, so a combination of
constraints that contradict each other (upper and lower case) is never produced. Words are runs
of letters and digits (``words``), sentences end at ``.``, ``!`` or ``?`` followed by white space
(``sentences``): the verifiers and the generators share these definitions.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
from typing import Callable, Optional, Sequence

import numpy as np

from kat_jax.data import chat

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def words(text: str) -> list[str]:
  """Runs of letters and digits (an inner apostrophe kept: "don't" is one word)."""
  return _WORD.findall(text)


def sentences(text: str) -> list[str]:
  """Pieces of ``text`` ending at ``.``, ``!`` or ``?`` followed by white space (or the end)."""
  return [s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if s]


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


def _has_word(text: str, word: str) -> bool:
  return re.search(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", text, re.IGNORECASE) is not None


def _count_word(text: str, word: str) -> int:
  return len(re.findall(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", text, re.IGNORECASE))


def _drop_word(text: str, word: str) -> str:
  return re.sub(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", "", text, flags=re.IGNORECASE)


# -- the content bank -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topic:
  """A programming question with material for templated answers."""
  name: str
  question: str
  title: str
  sentences: tuple[str, ...]
  keywords: tuple[str, ...]       # words that occur in ``sentences``
  glossary: tuple[tuple[str, str], ...]
  code: str                       # a short valid Python snippet


TOPICS = (
    Topic("lists", "What is a Python list?", "Python lists", (
        "A list is an ordered collection of values.",
        "Lists are mutable, so items can be added or removed after creation.",
        "You create a list with square brackets.",
        "Items are accessed by their index, starting from zero.",
        "The append method adds an item at the end of the list.",
        "A slice returns a new list with part of the items.",
        "One list can hold values of different types."),
        ("list", "index", "append", "mutable", "slice"),
        (("append", "adds an item at the end"), ("index", "the position of an item"),
         ("slice", "a part of the list"), ("len", "the number of items")),
        "items = [3, 1, 2]\nitems.append(4)\nprint(sorted(items))"),
    Topic("dicts", "How do Python dictionaries work?", "Dictionaries", (
        "A dictionary maps keys to values.",
        "Looking up a key takes about the same time however large the dictionary is.",
        "Keys must be hashable, such as strings or numbers.",
        "The get method returns a default when a key is missing.",
        "Iterating over a dictionary yields its keys in insertion order.",
        "Assigning to a key adds it or replaces its value.",
        "The items method gives the pairs of keys and values."),
        ("dictionary", "key", "value", "hashable", "get"),
        (("key", "the name a value is stored under"), ("value", "what a key maps to"),
         ("get", "a lookup with a default"), ("items", "the pairs of keys and values")),
        "ages = {'ana': 31}\nages['ben'] = 27\nprint(ages.get('eli', 0))"),
    Topic("functions", "Why should code be split into functions?", "Functions", (
        "A function gives a name to a piece of code.",
        "Small functions are easier to test than one long script.",
        "Parameters let the same function work on different inputs.",
        "A function returns a value with the return statement.",
        "Good names make a function explain itself.",
        "Reusing a function avoids copying the same code.",
        "Functions without side effects are simple to reason about."),
        ("function", "parameter", "return", "test", "name"),
        (("parameter", "an input of a function"), ("return", "the value handed back"),
         ("call", "running the function"), ("docstring", "the description of a function")),
        "def area(width, height):\n    return width * height\n\nprint(area(3, 4))"),
    Topic("recursion", "What is recursion?", "Recursion", (
        "Recursion is when a function calls itself.",
        "Every recursive function needs a base case that stops the calls.",
        "Each call works on a smaller part of the problem.",
        "Trees and nested lists are natural fits for recursion.",
        "Deep recursion can exhaust the call stack.",
        "Many recursive functions can be rewritten as loops."),
        ("recursion", "base", "call", "stack", "function"),
        (("base case", "the input that needs no further call"),
         ("stack", "the frames of the calls in progress"),
         ("depth", "how many calls are nested")),
        "def factorial(n):\n    return 1 if n <= 1 else n * factorial(n - 1)\n\n"
        "print(factorial(5))"),
    Topic("tests", "Why write unit tests?", "Unit tests", (
        "A unit test checks one small piece of code.",
        "Tests catch mistakes before users see them.",
        "A failing test points to the behaviour that changed.",
        "Tests make refactoring safe because they show nothing broke.",
        "Each test should be fast and independent of the others.",
        "An assertion states what the result must be."),
        ("test", "assertion", "refactoring", "failing", "code"),
        (("assertion", "a statement of the expected result"),
         ("fixture", "prepared data for a test"), ("regression", "a bug that came back")),
        "def add(a, b):\n    return a + b\n\n\ndef test_add():\n    assert add(2, 3) == 5"),
    Topic("git", "What is version control with git?", "Version control", (
        "Git records the history of a project as a series of commits.",
        "A commit stores a snapshot of the files with a message.",
        "Branches let work happen in parallel without conflicts.",
        "A merge combines the changes of two branches.",
        "You can go back to any earlier commit.",
        "Remote repositories let a team share its history."),
        ("git", "commit", "branch", "merge", "history"),
        (("commit", "a recorded snapshot"), ("branch", "a line of development"),
         ("merge", "combining two branches"), ("remote", "a shared copy of the repository")),
        "import subprocess\n\nsubprocess.run(['git', 'status'], check=False)"),
    Topic("exceptions", "How are errors handled in Python?", "Exceptions", (
        "Python reports errors by raising exceptions.",
        "A try block runs code that may fail.",
        "An except clause handles one kind of exception.",
        "The finally clause runs whether or not an error happened.",
        "Catching every exception hides real bugs.",
        "You can raise your own exception with a clear message."),
        ("exception", "try", "except", "raise", "error"),
        (("try", "the code that may fail"), ("except", "the handler of an error"),
         ("finally", "code that always runs"), ("raise", "signalling an error")),
        "try:\n    value = int('seven')\nexcept ValueError:\n    value = 0\nprint(value)"),
    Topic("classes", "What is a class in Python?", "Classes", (
        "A class describes a kind of object.",
        "Objects made from a class are called instances.",
        "Methods are functions that belong to a class.",
        "The init method sets up a new instance.",
        "Attributes hold the state of each object.",
        "Inheritance lets one class extend another."),
        ("class", "instance", "method", "attribute", "inheritance"),
        (("instance", "an object made from a class"), ("method", "a function of a class"),
         ("attribute", "a value stored on an object"), ("inheritance", "extending a class")),
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
        "print(Point(1, 2).x)"),
    Topic("loops", "How do loops work in Python?", "Loops", (
        "A for loop runs its body once for each item of a sequence.",
        "A while loop repeats as long as its condition is true.",
        "The break statement leaves a loop early.",
        "The continue statement skips to the next iteration.",
        "The range function produces numbers for counting loops.",
        "Loops over large data should avoid repeated work."),
        ("loop", "iteration", "break", "continue", "range"),
        (("iteration", "one run of the loop body"), ("break", "leaving the loop"),
         ("continue", "skipping to the next iteration"), ("range", "a sequence of numbers")),
        "total = 0\nfor n in range(5):\n    total += n\nprint(total)"),
    Topic("strings", "How are strings handled in Python?", "Strings", (
        "A string is an immutable sequence of characters.",
        "Strings can be written with single or double quotes.",
        "The format method and f strings insert values into text.",
        "The split method breaks a string into a list of words.",
        "The join method glues strings together with a separator.",
        "Methods such as upper and lower return new strings."),
        ("string", "immutable", "split", "join", "characters"),
        (("split", "breaking text into parts"), ("join", "gluing parts together"),
         ("strip", "removing white space at the ends"), ("upper", "capital letters")),
        "name = 'ada'\nprint(f'hello {name.upper()}')\nprint('a b c'.split())"),
    Topic("sorting", "How do you sort data in Python?", "Sorting", (
        "The sorted function returns a new sorted list.",
        "The sort method sorts a list in place.",
        "A key function decides what each item is compared by.",
        "Setting reverse to true sorts from largest to smallest.",
        "Python sorting is stable, so equal items keep their order.",
        "Sorting takes time proportional to n log n for n items."),
        ("sorted", "sort", "key", "stable", "reverse"),
        (("sorted", "a new sorted list"), ("sort", "sorting in place"),
         ("key", "what items are compared by"), ("stable", "equal items keep their order")),
        "words = ['pear', 'fig', 'apple']\nprint(sorted(words, key=len))"),
    Topic("venv", "Why use virtual environments?", "Virtual environments", (
        "A virtual environment keeps the packages of one project apart from others.",
        "Each project can then use the versions it needs.",
        "The venv module creates a new environment in a folder.",
        "Activating the environment puts its interpreter first on the path.",
        "A requirements file lists the packages to install.",
        "Deleting the folder removes the environment completely."),
        ("environment", "packages", "venv", "project", "requirements"),
        (("venv", "the module that creates environments"),
         ("pip", "the package installer"), ("requirements", "the list of packages")),
        "import venv\n\nbuilder = venv.EnvBuilder(with_pip=False)\nprint(builder.with_pip)"),
)

# Fillers for answers that need more sentences than a topic has.
GENERIC = ("This is a common idea in everyday programming.",
           "Practice with small examples makes it familiar.",
           "Reading good code shows how others use it.",
           "Clear code is easier to maintain later.",
           "Simple solutions are usually the best place to start.")

LANGUAGES = {
    "fr": ("French", (
        "Une fonction est un bloc de code qui porte un nom.",
        "Les tests sont utiles pour trouver les erreurs.",
        "Le code doit rester simple et lisible.",
        "Une liste contient des valeurs dans un ordre précis.",
        "Il est important de choisir des noms clairs pour les variables.",
        "Les programmeurs lisent le code plus souvent qu'ils ne l'écrivent.",
        "Cette idée est très courante dans la programmation.",
        "Nous pouvons corriger une erreur avec un test qui échoue.")),
    "de": ("German", (
        "Eine Funktion ist ein Block von Code mit einem Namen.",
        "Die Tests helfen dabei, Fehler früh zu finden.",
        "Der Code sollte einfach und gut lesbar sein.",
        "Eine Liste enthält Werte in einer festen Reihenfolge.",
        "Es ist wichtig, klare Namen für die Variablen zu wählen.",
        "Das Programm wird mit jedem Test zuverlässiger.",
        "Diese Idee ist in der Programmierung sehr verbreitet.",
        "Ein Fehler ist nicht schlimm, wenn ein Test ihn zeigt.")),
    "es": ("Spanish", (
        "Una función es un bloque de código con un nombre.",
        "Las pruebas ayudan a encontrar los errores pronto.",
        "El código debe ser simple y fácil de leer.",
        "Una lista contiene valores en un orden fijo.",
        "Es importante elegir nombres claros para las variables.",
        "Los programadores leen el código más veces de las que lo escriben.",
        "Esta idea es muy común en la programación.",
        "Podemos corregir un error con una prueba que falla.")),
}
# Function words that tell the languages apart (none is shared by two of them).
MARKERS = {
    "en": frozenset("the is are and of to with for that this it on an be".split()),
    "fr": frozenset("le les est une des et pour dans avec qui du sur pas sont cette nous il "
                    "un".split()),
    "de": frozenset("der die das ist und nicht mit für ein eine zu von den auf wird sind "
                    "sollte".split()),
    "es": frozenset("el los las una y para con por del se son esta muy como es un".split()),
}
# A word in two lists counts for both ("un": French and Spanish, "es": Spanish).


def language_counts(text: str) -> dict[str, int]:
  """How many words of ``text`` are marker words of each language."""
  found = [w.lower() for w in words(text)]
  return {lang: sum(w in markers for w in found) for lang, markers in MARKERS.items()}


def detect_language(text: str, min_markers: int = 3) -> Optional[str]:
  """The language whose marker words are most frequent (at least ``min_markers`` of them and
  strictly more than any other language's), else None."""
  counts = language_counts(text)
  best = max(counts, key=counts.get)
  others = max(v for k, v in counts.items() if k != best)
  return best if counts[best] >= min_markers and counts[best] > others else None


# -- categories -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """What ``comply`` may draw on: the topic, the sentences fillers come from (the topic's, or
  a language's once the answer was translated), and a generator."""
  topic: Topic
  rng: np.random.Generator
  pool: list

  def fill(self, have: Sequence[str], k: int) -> list[str]:
    """``have`` extended to ``k`` sentences with pool (then generic) sentences not yet used,
    cycling through the pool when it runs out."""
    out = list(have)
    unused = [s for s in list(self.pool) + list(GENERIC) if s not in out]
    i = 0
    while len(out) < k:
      out.append(unused[i % len(unused)] if unused else GENERIC[i % len(GENERIC)])
      i += 1
    return out


@dataclasses.dataclass(frozen=True)
class Category:
  """One kind of verifiable instruction (see the module docstring). ``stage`` orders how
  constraints are applied to a draft: content, length, structure, case, punctuation, framing,
  whole-answer encodings."""
  name: str
  stage: int
  draw: Callable[[np.random.Generator, Topic], dict]
  describe: Callable[[dict], str]
  check: Callable[[str, dict], bool]
  comply: Callable[[str, dict, Context], str]
  violate: Callable[[str, dict], str]


CATEGORIES: dict[str, Category] = {}


def _category(name: str, stage: int, *, draw, describe, check, comply, violate) -> None:
  if name in CATEGORIES:
    raise ValueError(f"instruction category {name!r} is defined twice")
  CATEGORIES[name] = Category(name, stage, draw, describe, check, comply, violate)


def _pick(rng: np.random.Generator, options: Sequence, k: Optional[int] = None):
  if k is None:
    return options[int(rng.integers(len(options)))]
  return [options[int(i)] for i in sorted(rng.choice(len(options), size=k, replace=False))]


def _int(rng: np.random.Generator, low: int, high: int) -> int:
  return int(rng.integers(low, high + 1))


def _first_alpha(text: str, change: Callable[[str], str]) -> str:
  """``text`` with its first letter passed through ``change``."""
  for i, ch in enumerate(text):
    if ch.isalpha():
      return text[:i] + change(ch) + text[i + 1:]
  return text


def _plural(n: int, word: str) -> str:
  return f"{n} {word}" if n == 1 else f"{n} {word}s"


# Content: language and words.

_category(
    "response_language", 0,
    draw=lambda rng, topic: {"language": _pick(rng, sorted(LANGUAGES))},
    describe=lambda p: (f"Your entire response must be in {LANGUAGES[p['language']][0]}; no "
                        "other language is allowed."),
    check=lambda text, p: detect_language(text) == p["language"],
    comply=lambda text, p, ctx: _translate(p["language"], ctx),
    violate=lambda text, p: " ".join(TOPICS[0].sentences[:4]))


def _translate(language: str, ctx: Context) -> str:
  bank = list(LANGUAGES[language][1])
  ctx.pool = bank
  return " ".join(_pick(ctx.rng, bank, 4))


_category(
    "include_keywords", 0,
    draw=lambda rng, topic: {"keywords": _pick(rng, topic.keywords, 2)},
    describe=lambda p: ("Include the keywords " + " and ".join(f"'{k}'" for k in p["keywords"])
                        + " in the response."),
    check=lambda text, p: all(_has_word(text, k) for k in p["keywords"]),
    comply=lambda text, p, ctx: _with_keywords(text, p["keywords"]),
    violate=lambda text, p: _drop_word(text, p["keywords"][0]))


def _with_keywords(text: str, keywords: Sequence[str]) -> str:
  missing = [k for k in keywords if not _has_word(text, k)]
  return text if not missing else f"{text} Key terms here: {' and '.join(missing)}."


_category(
    "forbidden_words", 0,
    draw=lambda rng, topic: {"forbidden": _pick(rng, topic.keywords, 2)},
    describe=lambda p: ("Do not include the words " + " or ".join(f"'{k}'" for k in p["forbidden"])
                        + " in the response."),
    check=lambda text, p: not any(_has_word(text, k) for k in p["forbidden"]),
    comply=lambda text, p, ctx: _without_words(text, p["forbidden"], ctx),
    violate=lambda text, p: f"{text} This is about the {p['forbidden'][0]}.")


def _without_words(text: str, forbidden: Sequence[str], ctx: Context) -> str:
  clean = lambda s: not any(_has_word(s, k) for k in forbidden)
  kept = [s for s in sentences(text) if clean(s)]
  extra = [s for s in list(ctx.pool) + list(GENERIC) if clean(s) and s not in kept]
  return " ".join((kept + extra)[:max(len(kept), 3)])


_category(
    "keyword_frequency", 0,
    draw=lambda rng, topic: {"keyword": _pick(rng, topic.keywords), "count": _int(rng, 2, 4)},
    describe=lambda p: (f"Use the word '{p['keyword']}' at least {p['count']} times in your "
                        "response."),
    check=lambda text, p: _count_word(text, p["keyword"]) >= p["count"],
    comply=lambda text, p, ctx: _repeat_keyword(text, p["keyword"], p["count"]),
    violate=lambda text, p: _keep_occurrences(text, p["keyword"], p["count"] - 1))


def _repeat_keyword(text: str, keyword: str, count: int) -> str:
  missing = count - _count_word(text, keyword)
  notes = [f"Remember the word {keyword} here." for _ in range(max(0, missing))]
  return " ".join([text] + notes)


def _keep_occurrences(text: str, keyword: str, keep: int) -> str:
  """``text`` with every occurrence of ``keyword`` after the first ``keep`` removed."""
  seen = 0

  def repl(match):
    nonlocal seen
    seen += 1
    return match.group(0) if seen <= keep else ""
  return re.sub(rf"(?<![^\W_]){re.escape(keyword)}(?![^\W_])", repl, text, flags=re.IGNORECASE)


# Length.

_category(
    "max_words", 1,
    draw=lambda rng, topic: {"max_words": _int(rng, 12, 40)},
    describe=lambda p: f"Answer with at most {_plural(p['max_words'], 'word')}.",
    check=lambda text, p: 0 < len(words(text)) <= p["max_words"],
    comply=lambda text, p, ctx: _fit(sentences(text), p["max_words"], lambda s: len(words(s))),
    violate=lambda text, p: " ".join([text] + ["More words keep coming here."] * (
        p["max_words"] // 5 + 1)))


def _fit(parts: Sequence[str], limit: int, size: Callable[[str], int]) -> str:
  """The leading sentences whose joined size is within ``limit`` (the first one cut to fit
  when even it is too long)."""
  kept = []
  for s in parts:
    if size(" ".join(kept + [s])) > limit:
      break
    kept.append(s)
  if kept:
    return " ".join(kept)
  tokens = parts[0].split() if parts else ["Yes."]
  out = []
  for token in tokens:
    if size(" ".join(out + [token]) + ".") > limit:
      break
    out.append(token)
  return (" ".join(out).rstrip(".,;:") + ".") if out else "Yes."


_category(
    "min_words", 1,
    draw=lambda rng, topic: {"min_words": _int(rng, 30, 70)},
    describe=lambda p: f"Answer with at least {p['min_words']} words.",
    check=lambda text, p: len(words(text)) >= p["min_words"],
    comply=lambda text, p, ctx: _lengthen(text, p["min_words"], ctx),
    violate=lambda text, p: _fit(sentences(text), max(1, p["min_words"] // 3),
                                 lambda s: len(words(s))))


def _lengthen(text: str, min_words: int, ctx: Context) -> str:
  parts = sentences(text)
  k = len(parts)
  while len(words(" ".join(parts))) < min_words:
    k += 1
    parts = ctx.fill(parts, k)
  return " ".join(parts)


def _one_more_sentence(text: str) -> str:
  """``text`` with one more sentence after its first one (before it if it has one), so that
  whatever wraps the sentences (a JSON string, tags) stays as it is."""
  extra = "One more sentence follows here."
  if _SENTENCE_END.search(text.strip()):
    return _SENTENCE_END.sub(f" {extra} ", text, count=1)
  return f"{extra} {text}"


_category(
    "sentence_count", 1,
    draw=lambda rng, topic: {"sentences": _int(rng, 2, 5)},
    describe=lambda p: f"Answer in exactly {_plural(p['sentences'], 'sentence')}.",
    check=lambda text, p: len(sentences(text)) == p["sentences"],
    comply=lambda text, p, ctx: " ".join(ctx.fill(sentences(text), p["sentences"])
                                         [:p["sentences"]]),
    violate=lambda text, p: _one_more_sentence(text))

_category(
    "max_chars", 1,
    draw=lambda rng, topic: {"max_chars": int(_int(rng, 8, 25) * 10)},
    describe=lambda p: f"Keep your answer under {p['max_chars']} characters.",
    check=lambda text, p: 0 < len(text.strip()) < p["max_chars"],
    comply=lambda text, p, ctx: _fit(sentences(text), p["max_chars"] - 1, len),
    violate=lambda text, p: text + " " + "x" * p["max_chars"])

# Structure.

_BULLET = re.compile(r"^\s*[*-]\s+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s+\S", re.MULTILINE)


def _drop_last_line(text: str, pattern: re.Pattern, group: int = 0) -> str:
  """``text`` without the line where ``pattern``'s last match (its ``group``) starts: the last
  list item or table row, wherever the other constraints put it."""
  matches = list(pattern.finditer(text))
  lines = text.split("\n")
  del lines[text.count("\n", 0, matches[-1].start(group))]
  return "\n".join(lines)


_category(
    "bullet_count", 2,
    draw=lambda rng, topic: {"bullets": _int(rng, 2, 5)},
    describe=lambda p: (f"Your answer must contain exactly {p['bullets']} bullet points, using "
                        "markdown bullets such as:\n* This is a point."),
    check=lambda text, p: len(_BULLET.findall(text)) == p["bullets"],
    comply=lambda text, p, ctx: "\n".join(
        f"* {s}" for s in ctx.fill(sentences(text), p["bullets"])[:p["bullets"]]),
    violate=lambda text, p: text + "\n* One more point.")

_category(
    "numbered_list", 2,
    draw=lambda rng, topic: {"items": _int(rng, 2, 5)},
    describe=lambda p: (f"Answer with a numbered list of exactly {p['items']} items (1., 2., "
                        "...)."),
    check=lambda text, p: [int(n) for n in _NUMBERED.findall(text)] == list(
        range(1, p["items"] + 1)),
    comply=lambda text, p, ctx: "\n".join(
        f"{i}. {s}" for i, s in enumerate(ctx.fill(sentences(text), p["items"])[:p["items"]],
                                          start=1)),
    violate=lambda text, p: _drop_last_line(text, _NUMBERED, 1) if p["items"] > 1 else
    text.replace("1. ", "", 1))

_category(
    "line_count", 2,
    draw=lambda rng, topic: {"lines": _int(rng, 2, 5)},
    describe=lambda p: f"Write exactly {_plural(p['lines'], 'line')}, one sentence per line.",
    check=lambda text, p: len(_lines(text)) == p["lines"],
    comply=lambda text, p, ctx: "\n".join(ctx.fill(sentences(text), p["lines"])[:p["lines"]]),
    violate=lambda text, p: text + "\nAnd one more line.")

_DIVIDER = re.compile(r"^\s*\*\*\*\s*$", re.MULTILINE)


def _paragraphs(parts: Sequence[str], n: int) -> list[str]:
  """``parts`` grouped into ``n`` paragraphs of consecutive sentences (none empty)."""
  groups = np.array_split(np.arange(len(parts)), n)
  return [" ".join(parts[i] for i in g) for g in groups]


def _divided(text: str) -> list[str]:
  return [part.strip() for part in _DIVIDER.split(text)]


_category(
    "paragraphs_divider", 2,
    draw=lambda rng, topic: {"paragraphs": _int(rng, 2, 4)},
    describe=lambda p: (f"There should be exactly {p['paragraphs']} paragraphs, separated by "
                        "the markdown divider ***."),
    check=lambda text, p: len(_divided(text)) == p["paragraphs"] and all(_divided(text)),
    comply=lambda text, p, ctx: "\n\n***\n\n".join(_paragraphs(
        ctx.fill(sentences(text), max(p["paragraphs"], len(sentences(text)))),
        p["paragraphs"])),
    violate=lambda text, p: _DIVIDER.sub("", text, count=1))


def _blank_paragraphs(text: str) -> list[str]:
  return [part for part in re.split(r"\n\s*\n", text.strip()) if part.strip()]


_category(
    "paragraphs_blank", 2,
    draw=lambda rng, topic: {"paragraphs": _int(rng, 2, 4)},
    describe=lambda p: (f"Write exactly {p['paragraphs']} paragraphs, separated by one blank "
                        "line."),
    check=lambda text, p: len(_blank_paragraphs(text)) == p["paragraphs"],
    comply=lambda text, p, ctx: "\n\n".join(_paragraphs(
        ctx.fill(sentences(text), max(p["paragraphs"], len(sentences(text)))),
        p["paragraphs"])),
    violate=lambda text, p: re.sub(r"\n\s*\n", "\n", text.strip(), count=1))

_category(
    "section_headers", 2,
    draw=lambda rng, topic: {"word": _pick(rng, ("SECTION", "Section", "PART")),
                             "sections": _int(rng, 2, 4)},
    describe=lambda p: (f"Your response must have {p['sections']} sections. Mark the beginning "
                        f"of each section with {p['word']} X, such as: {p['word']} 1."),
    check=lambda text, p: re.findall(rf"^{p['word']} (\d+)\b", text, re.MULTILINE) == [
        str(i) for i in range(1, p["sections"] + 1)],
    comply=lambda text, p, ctx: "\n\n".join(
        f"{p['word']} {i}\n{para}" for i, para in enumerate(_paragraphs(
            ctx.fill(sentences(text), max(p["sections"], len(sentences(text)))),
            p["sections"]), start=1)),
    violate=lambda text, p: re.sub(rf"^{p['word']} {p['sections']}\b", "And then", text,
                                   flags=re.MULTILINE))

_TITLE = re.compile(r"<<[^<>\n]+>>")

_category(
    "title", 2,
    draw=lambda rng, topic: {},
    describe=lambda p: ("Your answer must contain a title, wrapped in double angular brackets, "
                        "such as <<poem of joy>>."),
    check=lambda text, p: _TITLE.search(text) is not None,
    comply=lambda text, p, ctx: text if _TITLE.search(text) else f"<<{ctx.topic.title}>>\n{text}",
    violate=lambda text, p: text.replace("<<", "").replace(">>", ""))

_HEADING = re.compile(r"^#{1,6} \S", re.MULTILINE)
_HEADING_NAMES = ("Overview", "Details", "Example", "Summary")

_category(
    "headings", 2,
    draw=lambda rng, topic: {"headings": _int(rng, 2, 4)},
    describe=lambda p: (f"Organize the answer under exactly {p['headings']} markdown headings "
                        "(lines starting with ##)."),
    check=lambda text, p: len(_HEADING.findall(text)) == p["headings"],
    comply=lambda text, p, ctx: "\n\n".join(
        f"## {name}\n{para}" for name, para in zip(_HEADING_NAMES, _paragraphs(
            ctx.fill(sentences(text), max(p["headings"], len(sentences(text)))),
            p["headings"]))),
    violate=lambda text, p: text + "\n\n## Extra\nOne more part.")

_FENCE = re.compile(r"```python\n(.*?)\n```", re.DOTALL)


def _code_ok(text: str) -> bool:
  blocks = _FENCE.findall(text)
  if len(blocks) != 1 or text.count("```") != 2:
    return False
  try:
    ast.parse(blocks[0])
  except SyntaxError:
    return False
  return True


_category(
    "code_block", 2,
    draw=lambda rng, topic: {},
    describe=lambda p: ("Include exactly one Python code example in a ```python fenced block; "
                        "the code must be valid Python."),
    check=lambda text, p: _code_ok(text),
    comply=lambda text, p, ctx: f"{text}\n\n```python\n{ctx.topic.code}\n```",
    violate=lambda text, p: _FENCE.sub(lambda m: "```python\n" + m.group(1) + "\n    )(\n```",
                                       text))

_TABLE_ROW = re.compile(r"^[ \t]*\|.*\|[ \t]*$", re.MULTILINE)
_TABLE_SEPARATOR = re.compile(r"^\|(\s*:?-{3,}:?\s*\|)+$")


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip()[1:-1].split("|")]


def _table_rows(text: str, columns: Sequence[str]) -> Optional[int]:
  """Data rows of the one markdown table with header ``columns``, or None if there is not
  exactly one well-formed such table."""
  tables, current = [], []
  for line in text.splitlines() + [""]:
    if line.strip().startswith("|") and line.strip().endswith("|") and len(line.strip()) > 1:
      current.append(line.strip())
    elif current:
      tables.append(current)
      current = []
  if len(tables) != 1 or len(tables[0]) < 2:
    return None
  header, separator, *rows = tables[0]
  if _cells(header) != list(columns) or not _TABLE_SEPARATOR.match(separator):
    return None
  if any(len(_cells(r)) != len(columns) or not all(_cells(r)) for r in rows):
    return None
  return len(rows)


_category(
    "markdown_table", 2,
    draw=lambda rng, topic: {"columns": ["Term", "Meaning"],
                             "rows": _int(rng, 2, min(4, len(topic.glossary)))},
    describe=lambda p: (f"Include a markdown table with the columns {' and '.join(p['columns'])} "
                        f"and exactly {p['rows']} rows."),
    check=lambda text, p: _table_rows(text, p["columns"]) == p["rows"],
    comply=lambda text, p, ctx: (
        f"{text}\n\n| {' | '.join(p['columns'])} |\n|{' --- |' * len(p['columns'])}\n"
        + "\n".join(f"| {t} | {m} |" for t, m in ctx.topic.glossary[:p["rows"]])),
    violate=lambda text, p: _drop_last_line(text, _TABLE_ROW))

# Case (after the structure is in place).

_category(
    "lowercase", 3,
    draw=lambda rng, topic: {},
    describe=lambda p: ("Your entire response should be in lowercase letters; no capital "
                        "letters are allowed."),
    check=lambda text, p: any(c.isalpha() for c in text) and text == text.lower(),
    comply=lambda text, p, ctx: text.lower(),
    violate=lambda text, p: _first_alpha(text, str.upper))

_category(
    "uppercase", 3,
    draw=lambda rng, topic: {},
    describe=lambda p: "Your entire response should be in English capital letters only.",
    check=lambda text, p: any(c.isalpha() for c in text) and text == text.upper(),
    comply=lambda text, p, ctx: text.upper(),
    violate=lambda text, p: _first_alpha(text, str.lower))


def _capital_words(text: str) -> list[str]:
  return [w for w in words(text) if len(w) >= 2 and w.isupper()]


def _decapitalize_after(text: str, keep: int) -> str:
  seen = 0

  def repl(match):
    nonlocal seen
    w = match.group(0)
    if len(w) >= 2 and w.isupper():
      seen += 1
      return w if seen <= keep else w.capitalize()
    return w
  return _WORD.sub(repl, text)


_category(
    "capital_words_max", 3,
    draw=lambda rng, topic: {"max_capital_words": _int(rng, 0, 2)},
    describe=lambda p: (f"Use at most {_plural(p['max_capital_words'], 'word')} written "
                        "entirely in capital letters."),
    check=lambda text, p: len(_capital_words(text)) <= p["max_capital_words"],
    comply=lambda text, p, ctx: _decapitalize_after(text, p["max_capital_words"]),
    violate=lambda text, p: f"{text} THIS IS VERY IMPORTANT.")


def _capitalize_words(text: str, n: int) -> str:
  have = len(_capital_words(text))
  count = 0

  def repl(match):
    nonlocal count
    w = match.group(0)
    if count < n - have and len(w) >= 4 and not w.isupper() and w.isalpha():
      count += 1
      return w.upper()
    return w
  return _WORD.sub(repl, text)


_category(
    "capital_words_min", 3,
    draw=lambda rng, topic: {"min_capital_words": _int(rng, 2, 4)},
    describe=lambda p: (f"Stress the main points: write at least {p['min_capital_words']} words "
                        "entirely in capital letters."),
    check=lambda text, p: len(_capital_words(text)) >= p["min_capital_words"],
    comply=lambda text, p, ctx: _capitalize_words(text, p["min_capital_words"]),
    violate=lambda text, p: _decapitalize_after(text, 0))

# Punctuation and characters.

_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_category(
    "no_commas", 4,
    draw=lambda rng, topic: {},
    describe=lambda p: "In your entire response, refrain from the use of any commas.",
    check=lambda text, p: "," not in text,
    comply=lambda text, p, ctx: re.sub(r",\s*", " ", text).replace(",", ""),
    violate=lambda text, p: re.sub(r"(\w)(\s)", r"\1,\2", text, count=1) if re.search(
        r"\w\s", text) else text + ",")

_category(
    "no_digits", 4,
    draw=lambda rng, topic: {},
    describe=lambda p: "Do not use any digits in your response; spell numbers out in words.",
    check=lambda text, p: re.search(r"\d", text) is None,
    comply=lambda text, p, ctx: re.sub(r"\d", lambda m: _DIGIT_WORDS[int(m.group(0))], text),
    violate=lambda text, p: f"{text} It takes 2 steps.")

# A placeholder starts with a letter: a JSON list (["a"], [1, 2]) is not one.
_PLACEHOLDER = re.compile(r"\[[^\W\d_][^\[\]\n\"]*\]")
_PLACEHOLDER_NAMES = ("[name]", "[project]", "[date]", "[team]")

_category(
    "placeholders", 4,
    draw=lambda rng, topic: {"placeholders": _int(rng, 1, 3)},
    describe=lambda p: (f"The response must contain at least {p['placeholders']} placeholders "
                        "in square brackets, such as [address]."),
    check=lambda text, p: len(_PLACEHOLDER.findall(text)) >= p["placeholders"],
    comply=lambda text, p, ctx: (
        text if len(_PLACEHOLDER.findall(text)) >= p["placeholders"] else
        f"{text} Fill in " + " and ".join(_PLACEHOLDER_NAMES[:p["placeholders"]]) + "."),
    violate=lambda text, p: _PLACEHOLDER.sub(lambda m: m.group(0)[1:-1], text))

# Framing: how the answer starts and ends.

_category(
    "end_with_question", 5,
    draw=lambda rng, topic: {},
    describe=lambda p: "End your response with a question to the reader.",
    check=lambda text, p: text.rstrip().endswith("?"),
    comply=lambda text, p, ctx: f"{text.rstrip()}\nWould you like an example?",
    violate=lambda text, p: text.rstrip().rstrip("?") + ".")

_PREFIXES = ("Sure thing.", "Here is my answer.", "Good question.", "Let me explain.")
_SUFFIXES = ("Hope this helps.", "Is there anything else I can help with?", "That is all.")

_category(
    "starts_with", 5,
    draw=lambda rng, topic: {"prefix": _pick(rng, _PREFIXES)},
    describe=lambda p: f"Begin your response with the exact phrase '{p['prefix']}'.",
    check=lambda text, p: text.lstrip().startswith(p["prefix"]),
    comply=lambda text, p, ctx: f"{p['prefix']}\n{text}",
    violate=lambda text, p: "Well. " + text)

_category(
    "ends_with", 5,
    draw=lambda rng, topic: {"suffix": _pick(rng, _SUFFIXES)},
    describe=lambda p: (f"Finish your response with the exact phrase '{p['suffix']}' and no "
                        "other words after it."),
    check=lambda text, p: text.rstrip().endswith(p["suffix"]),
    comply=lambda text, p, ctx: f"{text.rstrip()}\n{p['suffix']}",
    violate=lambda text, p: f"{text.rstrip()} Bye.")


def _postscript_ok(text: str, marker: str) -> bool:
  paragraphs = _blank_paragraphs(text)
  return len(paragraphs) >= 2 and paragraphs[-1].lstrip().startswith(marker)


_category(
    "postscript", 5,
    draw=lambda rng, topic: {"marker": _pick(rng, ("P.S.", "P.P.S"))},
    describe=lambda p: (f"At the end of your response, add a postscript starting with "
                        f"{p['marker']}"),
    check=lambda text, p: _postscript_ok(text, p["marker"]),
    comply=lambda text, p, ctx: f"{text.rstrip()}\n\n{p['marker']} {GENERIC[1]}",
    violate=lambda text, p: text.rstrip().rsplit("\n\n", 1)[0])

_category(
    "single_line", 5,
    draw=lambda rng, topic: {},
    describe=lambda p: "Write your whole answer on a single line.",
    check=lambda text, p: bool(text.strip()) and "\n" not in text.strip(),
    comply=lambda text, p, ctx: " ".join(text.split()),
    violate=lambda text, p: text.strip().replace(" ", "\n", 1))

# Whole-answer encodings (at most one of them holds).


def _json(text: str):
  """The JSON value of the whole answer (a ```json fence allowed), else None."""
  text = text.strip()
  fenced = re.fullmatch(r"```(?:json)?\n(.*)\n```", text, re.DOTALL)
  if fenced:
    text = fenced.group(1)
  try:
    return json.loads(text)
  except ValueError:
    return None


_category(
    "json_object", 6,
    draw=lambda rng, topic: {},
    describe=lambda p: "Your entire output must be a JSON object.",
    check=lambda text, p: isinstance(_json(text), dict),
    comply=lambda text, p, ctx: json.dumps({"answer": text}, ensure_ascii=False),
    violate=lambda text, p: text.rstrip() + "\nThat is the object.")
_KEYS = ("summary", "details", "example", "advice")


def _json_with_keys(text: str, keys: Sequence[str], ctx: Context) -> str:
  parts = ctx.fill(sentences(text), len(keys))
  head, rest = parts[:len(keys) - 1], parts[len(keys) - 1:]
  values = head + [" ".join(rest)]
  return json.dumps(dict(zip(keys, values)), ensure_ascii=False, indent=2)


def _keys_ok(text: str, keys: Sequence[str]) -> bool:
  obj = _json(text)
  return (isinstance(obj, dict) and sorted(obj) == sorted(keys)
          and all(isinstance(v, str) and v.strip() for v in obj.values()))


_category(
    "json_keys", 6,
    draw=lambda rng, topic: {"keys": _pick(rng, _KEYS, _int(rng, 2, 3))},
    describe=lambda p: ("Answer with a JSON object whose keys are exactly "
                        + ", ".join(f"'{k}'" for k in p["keys"]) + ", each a string."),
    check=lambda text, p: _keys_ok(text, p["keys"]),
    comply=lambda text, p, ctx: _json_with_keys(text, p["keys"], ctx),
    violate=lambda text, p: json.dumps({k: v for k, v in (_json(text) or {}).items()
                                        if k != p["keys"][-1]}))


def _list_ok(text: str, n: int) -> bool:
  obj = _json(text)
  return (isinstance(obj, list) and len(obj) == n
          and all(isinstance(v, str) and v.strip() for v in obj))


_category(
    "json_list", 6,
    draw=lambda rng, topic: {"items": _int(rng, 2, 4)},
    describe=lambda p: f"Answer with a JSON array of exactly {p['items']} strings.",
    check=lambda text, p: _list_ok(text, p["items"]),
    comply=lambda text, p, ctx: json.dumps(ctx.fill(sentences(text), p["items"])[:p["items"]],
                                           ensure_ascii=False),
    violate=lambda text, p: json.dumps((_json(text) or []) + ["one more"]))

_category(
    "quotation", 6,
    draw=lambda rng, topic: {},
    describe=lambda p: "Wrap your entire response with double quotation marks.",
    check=lambda text, p: len(text.strip()) >= 2 and text.strip()[0] == '"' == text.strip()[-1],
    comply=lambda text, p, ctx: f'"{text.strip()}"',
    violate=lambda text, p: text.strip()[1:])


def _tagged_ok(text: str, tag: str) -> bool:
  s = text.strip()
  return (s.startswith(f"<{tag}>") and s.endswith(f"</{tag}>") and s.count(f"<{tag}>") == 1
          and s.count(f"</{tag}>") == 1 and bool(s[len(tag) + 2:-len(tag) - 3].strip()))


_category(
    "xml_tag", 6,
    draw=lambda rng, topic: {"tag": _pick(rng, ("answer", "response"))},
    describe=lambda p: f"Wrap your whole answer in <{p['tag']}></{p['tag']}> tags.",
    check=lambda text, p: _tagged_ok(text, p["tag"]),
    comply=lambda text, p, ctx: f"<{p['tag']}>\n{text.strip()}\n</{p['tag']}>",
    violate=lambda text, p: text.strip()[:-len(p["tag"]) - 3])

_SEPARATOR = "******"


def _two_ok(text: str) -> bool:
  parts = [part.strip() for part in re.split(r"(?<!\*)\*{6}(?!\*)", text)]
  return len(parts) == 2 and all(parts) and parts[0] != parts[1]


def _two_responses(text: str, ctx: Context) -> str:
  used = sentences(text)
  other = [s for s in list(ctx.pool) + list(GENERIC) if s not in used][:3]
  return f"{text.strip()}\n{_SEPARATOR}\n{' '.join(other)}"


_category(
    "two_responses", 6,
    draw=lambda rng, topic: {},
    describe=lambda p: ("Give two different responses. Separate them with 6 asterisk symbols: "
                        "******."),
    check=lambda text, p: _two_ok(text),
    comply=lambda text, p, ctx: _two_responses(text, ctx),
    violate=lambda text, p: text.replace(_SEPARATOR, "\n\n"))

_category(
    "repeat_request", 6,
    draw=lambda rng, topic: {"request": topic.question},
    describe=lambda p: ("First repeat the question word for word without change, then give "
                        "your answer (do not say anything before repeating the question)."),
    check=lambda text, p: (text.startswith(p["request"])
                           and bool(text[len(p["request"]):].strip())),
    comply=lambda text, p, ctx: f"{p['request']}\n{text}",
    violate=lambda text, p: text.replace(p["request"], p["request"][:-1] + ".", 1))


# -- examples ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InstructionExample:
  """A request with checkable instructions and a compliant answer. ``constraints`` are
  (category name, params) pairs, in the order the instructions are stated."""
  example_id: str
  topic: str
  question: str
  constraints: tuple
  answer: str

  @property
  def prompt(self) -> str:
    lines = [CATEGORIES[name].describe(params) for name, params in self.constraints]
    return self.question + "\n\n" + "\n".join(lines)

  def conversation(self) -> chat.Conversation:
    return chat.Conversation(
        (chat.Message("user", self.prompt), chat.Message("assistant", self.answer)),
        meta={"task_id": self.example_id, "source": "instructions",
              "constraints": [{"category": n, "params": p} for n, p in self.constraints]})


def check(text: str, category: str, params: dict) -> bool:
  """Whether ``text`` satisfies one constraint."""
  return bool(get_category(category).check(text, params))


def verify(text: str, constraints: Sequence) -> dict[str, bool]:
  """Each constraint's verdict on ``text``, by category name."""
  return {name: check(text, name, params) for name, params in constraints}


def get_category(name: str) -> Category:
  if name not in CATEGORIES:
    raise ValueError(f"unknown instruction category {name!r}: use one of {sorted(CATEGORIES)}")
  return CATEGORIES[name]


def comply_all(topic: Topic, constraints: Sequence, rng: np.random.Generator) -> str:
  """A draft answer to ``topic`` passed through every constraint's ``comply``, by stage."""
  ctx = Context(topic, rng, list(topic.sentences))
  text = " ".join(topic.sentences[:3])
  for name, params in sorted(constraints, key=lambda c: get_category(c[0]).stage):
    text = get_category(name).comply(text, params, ctx)
  return text


def make_example(rng: np.random.Generator, *, categories: Optional[Sequence[str]] = None,
                 num_constraints: int = 1, topic: Optional[Topic] = None,
                 max_tries: int = 24) -> InstructionExample:
  """One example: ``categories`` (else ``num_constraints`` drawn at random) with drawn
  parameters, and an answer every verifier accepts. Raises ValueError when ``max_tries`` draws
  of parameters (and, for random categories, of categories) give no such answer."""
  names = list(categories) if categories is not None else None
  for name in names or ():
    get_category(name)
  if names is None and not 1 <= num_constraints <= len(CATEGORIES):
    raise ValueError(f"num_constraints={num_constraints} must lie in [1, {len(CATEGORIES)}]")
  topic = topic or TOPICS[int(rng.integers(len(TOPICS)))]
  for _ in range(max_tries):
    chosen = names or _pick(rng, sorted(CATEGORIES), num_constraints)
    constraints = tuple((name, CATEGORIES[name].draw(rng, topic)) for name in chosen)
    answer = comply_all(topic, constraints, rng)
    if all(verify(answer, constraints).values()):
      key = json.dumps([topic.name, constraints, answer], sort_keys=True)
      example_id = "if-" + hashlib.sha256(key.encode()).hexdigest()[:12]
      return InstructionExample(example_id, topic.name, topic.question, constraints, answer)
  raise ValueError(f"no answer satisfies the constraints {names or num_constraints} of topic "
                   f"{topic.name!r} after {max_tries} tries (the categories may contradict)")


def make_examples(seed: int, num_examples: int, *, max_constraints: int = 2
                  ) -> list[InstructionExample]:
  """``num_examples`` examples, deterministic from ``seed``: example i leads with category
  ``i mod len(CATEGORIES)`` (so every category is covered), plus up to ``max_constraints - 1``
  random others that the verifiers accept together (else it keeps the leading one alone)."""
  names = sorted(CATEGORIES)
  out = []
  for i in range(num_examples):
    rng = np.random.default_rng([seed, i])
    lead = names[i % len(names)]
    extra = int(rng.integers(max_constraints)) if max_constraints > 1 else 0
    others = [n for n in names if n != lead]
    example = None
    if extra:
      for _ in range(8):
        chosen = [lead] + _pick(rng, others, extra)
        try:
          example = make_example(rng, categories=chosen, max_tries=3)
          break
        except ValueError:
          continue
    out.append(example or make_example(rng, categories=[lead]))
  return out
