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


def test_passages_topics_and_passage_probes():
    from nanoabsorber.probes import about_probes, blank, fact_probes, passage_probes, passages, topic

    text = ("Vell is a town on the River Osk. It was founded in 1641 by Anna Tor. Its mayor is Pim Ray.\n\n"
            "Dunmoor is a town. Its bridge became famous.")
    assert passages(text) == [text.split("\n\n")[0], text.split("\n\n")[1]]
    long_para = " ".join(f"Sentence {i} is here." for i in range(8))
    assert [len(p.split(".")) - 1 for p in passages(long_para, max_sents=3)] == [3, 3, 2]   # cut by sentences
    assert topic(passages(text)[0]) == "Vell" and topic("The bridge of Dunmoor is long.") == "Dunmoor"
    assert topic("it is quiet here.") is None and about_probes("it is quiet here.") == []
    assert about_probes(passages(text)[0]) == [("What does the text say about Vell?", passages(text)[0])]
    facts = fact_probes(passages(text)[0])
    # the topic is restored in every question, every name/number but the topic is blanked once
    assert ("About Vell, complete the sentence from the text: Its mayor is ___.", "Its mayor is Pim Ray.") in facts
    assert ("About Vell, complete the sentence from the text: It was founded in ___ by Anna Tor.",
            "It was founded in 1641 by Anna Tor.") in facts
    assert all(q.startswith("About Vell,") and "___" in q and a not in q for q, a in facts)
    # a blank replaces whole words only ("came" is not blanked inside "became")
    assert blank("Its bridge became famous when it came down.", "came") == "Its bridge became famous when it ___ down."
    assert blank("Its bridge became famous.", "came") == "Its bridge became famous."
    assert all("be___" not in q for q, _ in fact_probes(passages(text)[1]))
    groups = passage_probes(text, {"about", "fact", "recite"})     # window kinds are not passage kinds
    assert [g for _, g, _ in groups] == passages(text) and all(pr for _, _, pr in groups)
    assert [text[st:st + 4] for st, _, _ in groups] == ["Vell", "Dunm"]          # where each passage starts
    assert passage_probes(text, {"recite"}) == []


def test_passage_probes_teacher_sees_only_their_passage(monkeypatch):
    """absorb_text gives every passage its own (P, X, Y) group, X = the passage, next to the
    window group of the window kinds (X = the window)."""
    from nanoabsorber import absorber as ab
    from nanoabsorber.absorber import AbsorbConfig

    seen = []
    monkeypatch.setattr(ab, "absorb_stream", lambda model, ids, cfg, prefix, stop, log, extra, *a:
                        seen.append([extra(ci, ids[s:e]) for ci, (s, e, _) in
                                     enumerate(ab.chunk_windows(len(ids), cfg.chunk, cfg.sync_len))]) or [])

    class Tok(_ChatTok):
        chat_format, stop_ids, add_bos = True, {2}, False

        def decode(self, ids):
            return "".join(chr((i - 3) % 200) for i in ids)

    tok = Tok()
    text = "Vell is a town. Its mayor is Pim Ray.\n\nDunmoor is a town. Its mayor is Ola Fen."

    class M:       # absorb_text only needs a model that already carries LoRA
        pass
    monkeypatch.setattr("nanoabsorber.lora.lora_modules", lambda m: [1])
    ab.absorb_text(M(), tok, text, AbsorbConfig(probes="recite,about,fact"))
    groups = seen[0][0]                                                     # one window
    window_x = tok.encode(text.strip() + "\n\n")
    assert groups[0][1] == window_x                                          # recite: the whole window
    assert [g[1] for g in groups[1:]] == [tok.encode(p + "\n\n") for p in text.split("\n\n")]
    assert all(len(g[2]) == 1 + 2 for g in groups[1:])                      # about + 2 facts per passage
    # windows of 30 tokens (characters here): a passage goes to the window it starts in, whole
    seen.clear()
    ab.absorb_text(M(), tok, text, AbsorbConfig(probes="about", chunk=30, sync_len=0, replay=0))
    xs = [[g[1] for g in win] for win in seen[0]]
    assert len(xs) == 3 and xs[0] == [tok.encode(text.split("\n\n")[0] + "\n\n")]
    assert xs[1] == [tok.encode(text.split("\n\n")[1] + "\n\n")] and xs[2] == []   # "Dunmoor" starts at 39
    # replay: each window also absorbs earlier windows' passages again (at most `replay` of them)
    seen.clear()
    ab.absorb_text(M(), tok, text, AbsorbConfig(probes="about", chunk=30, sync_len=0, replay=1))
    xs = [[g[1] for g in win] for win in seen[0]]
    first, second = (tok.encode(p + "\n\n") for p in text.split("\n\n"))
    assert xs[:2] == [[first], [second, first]] and len(xs[2]) == 1 and xs[2][0] in (first, second)
    replayed = [[isinstance(g, ab.Replayed) for g in win] for win in seen[0]]
    assert replayed == [[False], [False, True], [True]]     # the last window holds replay only
