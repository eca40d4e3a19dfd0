"""Instruction following with checkable constraints: every category's verifier accepts the answers
generated for it and rejects its constructed violations and hand-written ones; combined examples
satisfy all their constraints; examples are deterministic and render for SFT."""
import json

import numpy as np
import pytest

from kat_jax.data import chat
from kat_jax.data import instructions as ins
from tests.data.byte_tokenizer import ByteTokenizer

NAMES = sorted(ins.CATEGORIES)


def test_at_least_thirty_categories_each_complete():
  assert len(NAMES) >= 30, NAMES
  for name, category in ins.CATEGORIES.items():
    assert category.name == name and 0 <= category.stage <= 6
  assert {"response_language", "json_object", "max_words", "include_keywords", "forbidden_words",
          "bullet_count", "lowercase", "starts_with", "ends_with"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_verifier_accepts_compliant_answers_and_rejects_violations(name):
  category = ins.CATEGORIES[name]
  for seed in range(24):
    rng = np.random.default_rng([seed, 11])
    topic = ins.TOPICS[seed % len(ins.TOPICS)]
    example = ins.make_example(rng, categories=[name], topic=topic, max_tries=1)
    [(got, params)] = example.constraints
    assert got == name
    assert category.check(example.answer, params), (params, example.answer)
    assert ins.verify(example.answer, example.constraints) == {name: True}
    violation = category.violate(example.answer, params)
    assert violation != example.answer
    assert not category.check(violation, params), (params, violation)
    # Parameters are plain JSON data (they travel in the conversation's meta).
    assert json.loads(json.dumps(params)) == params


# Hand-written answers that break one constraint each (params, answer), per category.
VIOLATIONS = {
    "response_language": [({"language": "fr"}, "The code is simple and it is fast to test."),
                          ({"language": "de"}, "Une fonction est un bloc de code avec un nom."),
                          ({"language": "es"}, "Der Code ist einfach und gut lesbar.")],
    "include_keywords": [({"keywords": ["list", "index"]}, "Lists hold values by position.")],
    "forbidden_words": [({"forbidden": ["git", "merge"]}, "Use GIT every day.")],
    "keyword_frequency": [({"keyword": "test", "count": 3}, "A test. Tests and testing. A test.")],
    "max_words": [({"max_words": 5}, "one two three four five six")],
    "min_words": [({"min_words": 6}, "one two three four five")],
    "sentence_count": [({"sentences": 2}, "One sentence. Two sentences. Three!")],
    "max_chars": [({"max_chars": 10}, "exactly 10"), ({"max_chars": 10}, "   ")],
    "bullet_count": [({"bullets": 2}, "* one\n* two\n- three"), ({"bullets": 2}, "*one\n*two")],
    "numbered_list": [({"items": 3}, "1. a\n2. b\n4. c"), ({"items": 2}, "1. a")],
    "line_count": [({"lines": 2}, "one\ntwo\nthree")],
    "paragraphs_divider": [({"paragraphs": 2}, "a\n***\n\n***\nb"), ({"paragraphs": 2}, "a\n\nb")],
    "paragraphs_blank": [({"paragraphs": 2}, "a\nb\nc")],
    "section_headers": [({"word": "SECTION", "sections": 2}, "SECTION 1\na\nSection 2\nb"),
                        ({"word": "PART", "sections": 2}, "PART 2\na\nPART 1\nb")],
    "title": [({}, "<title>\nText."), ({}, "<<\n>> text")],
    "headings": [({"headings": 2}, "## One\ntext\n#Two\ntext")],
    "code_block": [({}, "```python\nprint(1)\n```\n```python\nprint(2)\n```"),
                   ({}, "```python\ndef f(:\n```"), ({}, "```\nprint(1)\n```")],
    "markdown_table": [({"columns": ["Term", "Meaning"], "rows": 2},
                        "| Term | Meaning |\n| --- | --- |\n| a | b |\n| c |"),
                       ({"columns": ["Term", "Meaning"], "rows": 1},
                        "| Term | Note |\n| --- | --- |\n| a | b |")],
    "lowercase": [({}, "all lower but One"), ({}, "123 ...")],
    "uppercase": [({}, "ALL UPPER BUt ONE")],
    "capital_words_max": [({"max_capital_words": 1}, "USE TWO capital words")],
    "capital_words_min": [({"min_capital_words": 2}, "Only ONE here, I think")],
    "no_commas": [({}, "one, two")],
    "no_digits": [({}, "version 3 is out")],
    "placeholders": [({"placeholders": 2}, "Dear [name], see you on the date."),
                     ({"placeholders": 1}, '["A JSON list.", "Is no placeholder."]')],
    "end_with_question": [({}, "Is it? No.")],
    "starts_with": [({"prefix": "Sure thing."}, "sure thing. here it is")],
    "ends_with": [({"suffix": "That is all."}, "That is all. Really.")],
    "postscript": [({"marker": "P.S."}, "P.S. at the start\n\nthen text"),
                   ({"marker": "P.S."}, "Text.\n\nPS: no dots")],
    "single_line": [({}, "one\ntwo")],
    "json_object": [({}, '{"a": 1} trailing'), ({}, "[1, 2]")],
    "json_keys": [({"keys": ["summary", "details"]}, '{"summary": "a", "details": "b", "x": "c"}'),
                  ({"keys": ["summary", "details"]}, '{"summary": "a", "details": 3}')],
    "json_list": [({"items": 2}, '["a", 2]'), ({"items": 2}, '["a", "b", "c"]')],
    "quotation": [({}, '"only the opening'), ({}, '"')],
    "xml_tag": [({"tag": "answer"}, "<answer>a</answer><answer>b</answer>"),
                ({"tag": "answer"}, "<answer></answer>")],
    "two_responses": [({}, "same\n******\nsame"), ({}, "a\n*******\nb")],
    "repeat_request": [({"request": "What is a list?"}, "What is a list?"),
                       ({"request": "What is a list?"}, "what is a list? A collection.")],
}


def test_hand_written_violations_are_rejected():
  assert set(VIOLATIONS) == set(NAMES)
  for name, cases in VIOLATIONS.items():
    for params, answer in cases:
      assert not ins.check(answer, name, params), (name, params, answer)


def test_hand_written_compliant_answers_are_accepted():
  cases = [("response_language", {"language": "de"}, "Die Funktion ist kurz und der Test ist gut."),
           ("json_object", {}, '```json\n{"answer": "yes"}\n```'),
           ("bullet_count", {"bullets": 2}, "Intro line\n* one\n- two"),
           ("numbered_list", {"items": 2}, "1) first\n2. second"),
           ("two_responses", {}, "first answer ****** second answer"),
           ("postscript", {"marker": "P.P.S"}, "Body.\n\nP.P.S one more thing"),
           ("sentence_count", {"sentences": 3}, "One. Two! Three?"),
           ("capital_words_max", {"max_capital_words": 0}, "I use no shouting words."),
           ("forbidden_words", {"forbidden": ["list"]}, "Lists and listings are fine.")]
  for name, params, answer in cases:
    assert ins.check(answer, name, params), (name, answer)


def test_language_detection_tells_the_banks_apart():
  for language, (_, bank) in ins.LANGUAGES.items():
    assert ins.detect_language(" ".join(bank)) == language
    assert ins.detect_language(bank[0] + " " + bank[1]) == language
  english = " ".join(ins.TOPICS[0].sentences)
  assert ins.detect_language(english) == "en"
  assert ins.detect_language("x y z") is None


def test_combined_examples_satisfy_every_constraint_and_cover_every_category():
  examples = ins.make_examples(seed=3, num_examples=2 * len(NAMES), max_constraints=3)
  assert examples == ins.make_examples(seed=3, num_examples=2 * len(NAMES), max_constraints=3)
  assert examples != ins.make_examples(seed=4, num_examples=2 * len(NAMES), max_constraints=3)
  assert {e.constraints[0][0] for e in examples} == set(NAMES)
  assert max(len(e.constraints) for e in examples) == 3
  assert sum(len(e.constraints) > 1 for e in examples) > len(examples) // 3
  for example in examples:
    assert all(ins.verify(example.answer, example.constraints).values()), example
    for name, params in example.constraints:
      assert ins.CATEGORIES[name].describe(params) in example.prompt
  assert len({e.example_id for e in examples}) == len(examples)


def test_violations_break_their_constraint_in_combined_answers_too():
  """``violate`` edits a compliant answer so that its own verifier rejects it also when other
  constraints shaped the answer (a table before a divider, a list inside tags, sentences inside
  a JSON string): the negative examples of every category, whatever it is combined with."""
  examples = ins.make_examples(seed=5, num_examples=12 * len(NAMES), max_constraints=3)
  checked = set()
  for example in examples:
    for name, params in example.constraints:
      broken = ins.CATEGORIES[name].violate(example.answer, params)
      assert not ins.check(broken, name, params), (example.constraints, example.answer, broken)
      checked.add(name)
  assert checked == set(NAMES)
  # The cases that once slipped through, by hand.
  table = "Intro.\n\n| Term | Meaning |\n| --- | --- |\n| a | b |\n| c | d |\n******\nMore."
  assert ins.check(table, "markdown_table", {"columns": ["Term", "Meaning"], "rows": 2})
  assert not ins.check(ins.CATEGORIES["markdown_table"].violate(table, {}), "markdown_table",
                       {"columns": ["Term", "Meaning"], "rows": 2})
  tagged = "<response>\n1. One.\n2. Two.\n</response>"
  assert not ins.check(ins.CATEGORIES["numbered_list"].violate(tagged, {"items": 2}),
                       "numbered_list", {"items": 2})
  wrapped = '{"answer": "One. Two."}'
  assert ins.check(wrapped, "sentence_count", {"sentences": 2})
  assert not ins.check(ins.CATEGORIES["sentence_count"].violate(wrapped, {"sentences": 2}),
                       "sentence_count", {"sentences": 2})


def test_contradicting_categories_are_refused_with_a_clear_error():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="no answer satisfies the constraints"):
    ins.make_example(rng, categories=["lowercase", "uppercase"])
  with pytest.raises(ValueError, match="unknown instruction category 'bogus'"):
    ins.make_example(rng, categories=["bogus"])


def test_conversation_renders_with_loss_on_the_answer_only():
  example = ins.make_examples(seed=0, num_examples=1)[0]
  conversation = example.conversation()
  assert conversation == chat.Conversation.from_json(conversation.to_json())
  assert [c["category"] for c in conversation.meta["constraints"]] == [
      n for n, _ in example.constraints]
  tok = ByteTokenizer()
  rendered = chat.render(conversation, tok)
  assert tok.decode(rendered.tokens[rendered.loss_mask]) == example.answer + "<|im_end|>"
