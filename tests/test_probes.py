"""What Y is made of: probe conversations laid out as the questions asked later."""
from nanoabsorber.probes import chat_probe_ids, make_probes, question_ids


def test_continue_probes_start_at_every_sentence_and_stay_in_their_paragraph():
    from nanoabsorber.probes import continue_probes

    text = "Anna keeps bees in a garden. Her hives are blue and old.\n\nThe town of Vell has one bridge over it."
    pr = continue_probes(text, words=3)
    assert [q for q, _ in pr] == ['Continue the text from "Anna keeps bees".',
                                  'Continue the text from "Her hives are".',
                                  'Continue the text from "The town of".']
    assert pr[0][1] == "in a garden. Her hives are blue and old."      # rest of the paragraph, not the next one
    assert pr[2][1] == "Vell has one bridge over it."


class _ChatTok:
    """A character-level chat tokenizer: enough to check the token layout of probes."""
    add_bos, bos_id, eos_id = False, None, 1
    special_tokens = {"<|im_end|>": 2}

    def apply_chat_template(self, msgs, add_generation_prompt=True):
        body = "".join(f"<{m['role']}>{m['content']}<end>" for m in msgs)
        return body + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text, bos=False):
        return [3 + ord(c) % 200 for c in text]


def test_probe_layout_is_the_question_layout():
    """A probe's P·X·Y starts exactly like the prompt later used to ask the question with the
    document: the absorbed model is asked in the layout it was trained on."""
    tok = _ChatTok()
    doc = "Mira Okafor keeps bees. The town of Vell has one bridge."
    prefix, x, ys, tail = chat_probe_ids(tok, doc, [("Who keeps bees?", "Mira Okafor.")])
    q = question_ids(tok, "Who keeps bees?", doc)
    assert q == prefix + x + tok.encode("Who keeps bees?" + tail)
    assert ys[0][:len(q) - len(prefix) - len(x)] == q[len(prefix) + len(x):]
    assert ys[0][-1] == 2                                     # every answer ends with <|im_end|>
    assert question_ids(tok, "Who?") == prefix + tok.encode("Who?" + tail)   # no document: no X


def test_make_probes_kinds():
    text = "Anna keeps bees in Vell. The bridge was built in 1887."
    assert make_probes(text, {"recite"}) == [("Repeat the text above word for word.", text)]
    entity = make_probes(text, {"entity"})
    assert any("Anna" in q for q, _ in entity) and any("1887" in a for _, a in entity)
    assert make_probes(text, set()) == []
