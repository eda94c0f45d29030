"""nanoabsorber.benchdocs: generated fact documents and stories, the JSONL task loader's errors,
and document segments."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoabsorber import benchdocs
from nanoabsorber.errors import UserError

# ------------------------------------------------------------------------------------------
# Generated documents
# ------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n_tokens=st.sampled_from([20, 60, 150]), n_facts=st.integers(1, 7))
def test_fact_questions_are_answerable_from_their_document(seed, n_tokens, n_facts):
    doc = benchdocs.make_fact_doc(seed, n_tokens, n_facts)
    assert benchdocs.word_count(doc.text) >= n_tokens == n_tokens and doc.n_tokens == benchdocs.word_count(doc.text)
    assert len(doc.facts) == n_facts
    for f in doc.facts:
        assert f.sentence in doc.text
        assert all(a in f.sentence for a in f.answers)  # the answer occurs in the document, in its fact
        assert f.position in benchdocs.POSITIONS and f.question.endswith("?")
    assert len({f.question for f in doc.facts}) == n_facts
    # positions: beginning facts in the first paragraph block, end facts in the last
    paras = doc.text.split("\n\n")
    for f in doc.facts:
        i = next(k for k, p in enumerate(paras) if f.sentence in p)
        if f.position == "beginning":
            assert i < sum(1 for g in doc.facts if g.position == "beginning")
        if f.position == "end":
            assert i >= len(paras) - sum(1 for g in doc.facts if g.position == "end")


def test_fact_docs_are_deterministic_and_differ_per_seed():
    a, b, c = benchdocs.make_fact_doc(3, 200, 6), benchdocs.make_fact_doc(3, 200, 6), benchdocs.make_fact_doc(4, 200, 6)
    assert a.text == b.text and [f.question for f in a.facts] == [f.question for f in b.facts]
    assert a.text != c.text and [f.answers for f in a.facts] != [f.answers for f in c.facts]
    assert [f.position for f in a.facts] == ["beginning", "middle", "end"] * 2


def test_fact_doc_length_follows_the_count_function_and_filler_has_no_entities():
    from nanoabsorber.probes import entities

    doc = benchdocs.make_fact_doc(1, 300, 3, count=len)    # characters as "tokens"
    assert len(doc.text) >= 300
    fillers = " ".join(benchdocs.filler_paragraph(random.Random(k)) for k in range(20))
    assert entities(fillers) == []
    story = benchdocs.make_story(0, 120)
    assert benchdocs.word_count(story) >= 120 and story == benchdocs.make_story(0, 120) and story != benchdocs.make_story(1, 120)


# ------------------------------------------------------------------------------------------
# JSONL tasks
# ------------------------------------------------------------------------------------------

def test_load_tasks_reads_strings_and_lists(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"context": "a b", "question": "q?", "answer": "x"}\n\n'
                 '{"context": "c", "question": "r?", "answer": ["y", "z"], "id": 7}\n')
    tasks = benchdocs.load_tasks(f)
    assert [t["answers"] for t in tasks] == [["x"], ["y", "z"]]
    assert [t["line"] for t in tasks] == [1, 3] and tasks[1]["id"] == 7


@pytest.mark.parametrize("line, problem", [
    ('{"context": "c", "question": "q"', "not valid JSON"),
    ('["c", "q", "a"]', "expected a JSON object"),
    ('{"context": "c", "answer": "a"}', "missing key(s) question"),
    ('{"context": "", "question": "q", "answer": "a"}', "'context' must be a non-empty string"),
    ('{"context": "c", "question": "q", "answer": 3}', "'answer' must be"),
    ('{"context": "c", "question": "q", "answer": []}', "'answer' must be"),
])
def test_load_tasks_names_file_and_line(tmp_path, line, problem):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"context": "c", "question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(benchdocs.TaskFileError) as e:
        benchdocs.load_tasks(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: ") and problem in msg and "\n" not in msg


def test_load_tasks_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="e.jsonl: is empty"):
        benchdocs.load_tasks(tmp_path / "e.jsonl")
    (tmp_path / "n.jsonl").write_text("\n  \n\n x")
    with pytest.raises(benchdocs.TaskFileError, match="n.jsonl:4: not valid JSON"):
        benchdocs.load_tasks(tmp_path / "n.jsonl")
    with pytest.raises(UserError, match="no such file"):
        benchdocs.load_tasks(tmp_path / "nope.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b'{"context": "c", "question": "q", "answer": "a"}\n\xff\xfe\n')
    with pytest.raises(UserError, match=r"b.jsonl: not UTF-8 text \(invalid byte at offset 49\)"):
        benchdocs.load_tasks(tmp_path / "b.jsonl")



class _CharTok:
    """One token per character: enough for document_segments."""

    def encode(self, s):
        return [ord(c) for c in s]


def test_document_segments_are_evenly_spaced_and_start_at_lines():
    text = "".join(f"line {k:04d} " + "x" * 40 + "\n" for k in range(200))
    segs = benchdocs.document_segments(text, _CharTok(), 300, 3)
    assert [len(s) for s in segs] == [300] * 3
    starts = ["".join(map(chr, s[:9])) for s in segs]
    assert starts[0] == "line 0000" and all(s.startswith("line ") for s in starts)   # at line starts
    first = [int(s[5:9]) for s in starts]
    assert first[0] < first[1] < first[2] and first[2] > 150                         # spread over the text
    with pytest.raises(benchdocs.UserError, match="doc.txt: too short"):
        benchdocs.document_segments("short text\n", _CharTok(), 300, 1, "doc.txt")
