"""Absorber invariants on tiny random models: zero loss without context, steps reduce the loss,
every objective runs through one loop, streaming memory is bounded by n + m, the student's
sequence starts with the same prefix (BOS) as generation, non-finite losses keep the last good
adapter."""
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoabsorber.absorber as ab
from nanoabsorber.absorber import AbsorbConfig, absorb_chunk, absorb_stream, chunk_windows, teacher_targets
from nanoabsorber.lora import lora_parameters, lora_state_dict
from tests.conftest import ids, lora_model

@pytest.mark.parametrize("loss", ["l1", "mse", "l1_norm", "kl", "hybrid"])
def test_sync_loss_is_zero_when_x_is_empty(loss):
    m = lora_model()
    cfg = AbsorbConfig(loss=loss, steps=0)
    res = absorb_chunk(m, [([5], [], [ids(12, 1), ids(7, 2)])], cfg)
    assert res.final_loss == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", ["l1", "l1_norm", "kl", "hybrid"])
def test_a_few_steps_strictly_reduce_the_sync_loss(loss):
    torch.manual_seed(0)
    m = lora_model()
    cfg = AbsorbConfig(loss=loss, steps=6, lr=1e-2)
    res = absorb_chunk(m, [([], ids(40, 3), [ids(24, 4), ids(16, 5)])], cfg)
    assert res.steps == 6 and len(res.losses) == 7
    assert res.final_loss < res.first_loss * 0.9
    assert all(b < a for a, b in zip(res.losses, res.losses[1:])), res.losses


def test_ntp_objective_reduces_next_token_loss():
    m = lora_model()
    res = absorb_chunk(m, [([], ids(48, 6), [])], AbsorbConfig(objective="ntp", steps=5, lr=1e-2))
    assert res.final_loss < res.first_loss


def test_teacher_targets_match_a_plain_forward_of_x_y():
    """The cached teacher pass (X prefilled once) equals a forward of P·X·Y at Y's positions."""
    m = lora_model()
    p, x, ys = [3], ids(20, 7), [ids(9, 8), ids(5, 9)]
    t = teacher_targets(m, [(p, x, ys)], need_hidden=True, need_final=True)
    with torch.no_grad():
        for j, y in enumerate(ys):
            _, hs = m(torch.tensor([p + x + y]), hidden=True)
            want = torch.stack([h[0, len(p) + len(x):] for h in hs])
            off = sum(len(v) for v in ys[:j])
            torch.testing.assert_close(t.hidden[:, off:off + len(y)], want, atol=1e-5, rtol=1e-5)
    assert t.ids[0, 0] == 3 and not t.mask[:, 0].any()      # the prefix is not a loss position
    assert t.mask.sum() == sum(len(y) for y in ys)


@pytest.mark.parametrize("kind", ["l1", "mse", "l1_norm"])
@pytest.mark.parametrize("sink", [0, 1, 3])
def test_hidden_loss_leaves_out_the_attention_sink_positions(sink, kind):
    """With no prefix the student's first Y token is the attention sink: sink_positions leading
    positions of each student sequence are left out of the hidden-state distance, exactly. The
    loss, summed layer by layer, equals the distance of the stacked (L+1, N, D) states, and so
    do its LoRA gradients."""
    from nanoabsorber.losses import hidden_sync_loss
    from nanoabsorber.lora import lora_parameters
    m = lora_model()
    for p in lora_parameters(m):                               # B = 0 at init: make the gradients of A non-zero
        torch.nn.init.normal_(p, std=0.05)
    ys = [ids(9, 8), ids(6, 9)]
    t = teacher_targets(m, [([], ids(20, 7), ys)], need_hidden=True, need_final=False)
    for p in lora_parameters(m):                               # a student that differs from the teacher
        p.data.add_(0.05)

    def grads(loss):
        return [g.clone() for g in torch.autograd.grad(loss, lora_parameters(m))]

    got = ab.sync_loss(m, t, AbsorbConfig(loss=kind, sink_positions=sink))
    _, hs = m(t.ids, hidden=True, logits=False)
    keep = torch.cat([torch.arange(len(y)) >= sink for y in ys])
    want = hidden_sync_loss(torch.stack([h[t.mask] for h in hs])[:, keep], t.hidden[:, keep], kind)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads(got), grads(want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    if sink:
        with torch.no_grad():
            assert not torch.isclose(got, ab.sync_loss(m, t, AbsorbConfig(loss=kind, sink_positions=0)))


def test_sink_positions_is_a_no_op_behind_a_prefix():
    """Behind BOS or the chat header (the chat-probe recipe) position 0 is the prefix, never a Y
    position, so the default sink_positions = 1 leaves the loss unchanged."""
    m = lora_model()
    t = teacher_targets(m, [([3], ids(20, 7), [ids(9, 8), ids(6, 9)])], need_hidden=True, need_final=True)
    with torch.no_grad():
        for loss in ("l1", "hybrid"):
            a = ab.sync_loss(m, t, AbsorbConfig(loss=loss, sink_positions=0))
            assert torch.equal(a, ab.sync_loss(m, t, AbsorbConfig(loss=loss, sink_positions=1)))


def test_batch_tokens_subsets_and_micro_batches_give_the_full_loss():
    m = lora_model()
    groups = [([], ids(30, 1), [ids(n, 10 + n) for n in (5, 17, 9, 30, 2)])]
    t = teacher_targets(m, groups, True, False)
    cfg = AbsorbConfig(loss="l1")
    with torch.no_grad():
        full = float(ab.sync_loss(m, t, cfg))
        # perturb the LoRA so the loss is non-zero everywhere, then compare full vs micro-batched
        for k, v in lora_state_dict(m).items():
            v.add_(torch.randn_like(v) * 0.05)
        full = float(ab.sync_loss(m, t, cfg))
        micro = ab._accumulate(m, t, list(range(5)), replace(cfg, micro_tokens=40), backward=False)
    assert micro == pytest.approx(full, rel=1e-5)


def _host_syncs(fn) -> int:
    """How many ops in fn() wait for a data-dependent result on the host (on CUDA each is a device
    sync): nonzero, .item()/bool()/int(), masked_select, boolean-mask indexing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            bool_index = func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])
            if bool_index or func in (torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default,
                                      torch.ops.aten.masked_select.default):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("loss", ["l1", "hybrid"])
def test_a_step_waits_on_the_device_a_fixed_number_of_times(loss):
    # a step's host syncs must not grow with the Y sequences (a per-row .nonzero() did) or the layers
    # (a boolean mask per layer did): on a GPU each one stalls the launch queue
    counts = {}
    for layers in (2, 5):
        m = lora_model(layers=layers)
        for n_rows in (3, 12):
            groups = [([], ids(20, 1), [ids(4 + k % 5, 10 + k) for k in range(n_rows)])]
            t = teacher_targets(m, groups, True, loss == "hybrid")
            cfg = AbsorbConfig(loss=loss, micro_tokens=4096)
            counts[layers, n_rows] = _host_syncs(lambda: ab._accumulate(m, t, list(range(n_rows)), cfg, True))
    assert len(set(counts.values())) == 1, counts


_MAG_MODEL = {}


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(0, 4), min_size=1, max_size=5, unique=True), sink=st.integers(0, 3))
def test_teacher_magnitude_of_any_rows_is_the_sum_over_their_counted_positions(rows, sink):
    # l1_norm's denominator from per-row sums (no copy of the rows' states) equals the direct sum
    # over the rows' copied states, the sink positions left out unless nothing else is left
    if not _MAG_MODEL:
        m = lora_model()
        groups = [([], ids(12, 1), [ids(n, 10 + n) for n in (1, 7, 2, 9, 1)])]
        _MAG_MODEL["t"] = teacher_targets(m, groups, True, False)
    t = _MAG_MODEL["t"]
    sub = t.rows(rows)
    direct = sub.hidden[:, ab._kept(sub, sink)].abs().sum((1, 2))
    torch.testing.assert_close(t.magnitude(rows, sink), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["l1", "kl", "l1_norm", "hybrid"])
def test_micro_tokens_give_the_same_gradient(loss):
    # the memory lever: smaller micro-batches, the same loss and LoRA gradient (summed exactly)
    m = lora_model()
    for v in lora_state_dict(m).values():
        v.data.add_(torch.randn_like(v) * 0.05)
    groups = [([], ids(30, 1), [ids(n, 10 + n) for n in (5, 17, 9, 30, 2)])]
    t = teacher_targets(m, groups, loss != "kl", loss in ("kl", "hybrid"))
    out = []
    for mt in (4096, 31, 1):     # one pass, several, one sequence per pass
        m.zero_grad(set_to_none=True)
        lv = ab._accumulate(m, t, list(range(5)), AbsorbConfig(loss=loss, micro_tokens=mt), backward=True)
        out.append((lv, [p.grad.clone() for p in lora_parameters(m)]))
    for lv, grads in out[1:]:
        assert lv == pytest.approx(out[0][0], rel=1e-5)
        for g, g0 in zip(grads, out[0][1]):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(n_tokens=st.integers(1, 5000), n=st.integers(1, 700), m=st.integers(0, 700))
def test_chunk_windows_partition_the_stream(n_tokens, n, m):
    w = chunk_windows(n_tokens, n, m)
    assert w[0][0] == 0 and w[-1][1] == n_tokens
    for (s, e, ye), nxt in zip(w, w[1:] + [None]):
        assert 0 < e - s <= n and e <= ye <= min(e + m, n_tokens)
        if nxt:
            assert nxt[0] == e


def test_streaming_memory_is_bounded_by_window(monkeypatch):
    """Every forward during streaming sees at most P + n + m tokens and every KV cache is sized
    by the window, however long the stream (a 20x longer stream touches no bigger tensors)."""
    m = lora_model(layers=1)
    seen = {"tokens": 0, "cache": 0, "hidden": 0}
    real_forward, real_cache, real_tt = m.forward, m.new_cache, ab.teacher_targets

    def forward(idx, cache=None, **kw):
        seen["tokens"] = max(seen["tokens"], idx.shape[1] + (cache.pos if cache is not None else 0))
        return real_forward(idx, cache=cache, **kw)

    def new_cache(batch=1, max_len=None):
        seen["cache"] = max(seen["cache"], max_len)
        return real_cache(batch, max_len)

    def tt(*a, **kw):
        t = real_tt(*a, **kw)
        seen["hidden"] = max(seen["hidden"], t.hidden.shape[1])
        return t

    monkeypatch.setattr(m, "forward", forward)
    monkeypatch.setattr(m, "new_cache", new_cache)
    monkeypatch.setattr(ab, "teacher_targets", tt)
    cfg = AbsorbConfig(steps=1, chunk=32, sync_len=16, gen_tokens=8, gen_samples=2)
    peaks = []
    for length in (100, 2000):
        seen.update(tokens=0, cache=0, hidden=0)
        stream = torch.randint(0, 97, (length,)).numpy()   # any sliceable stream works
        res = absorb_stream(m, stream, cfg, prefix=[1])
        assert len(res) == -(-length // 32)
        peaks.append(dict(seen))
    bound = 1 + 32 + 16
    assert peaks[0] == peaks[1], peaks
    assert all(v <= bound for v in peaks[1].values()), peaks


def test_student_sequence_starts_with_bos_like_generation(monkeypatch):
    """For tokenizers that add BOS, both teacher (BOS·X·Y) and student (BOS·Y) start with BOS,
    which is how generation with the absorbed model starts too."""
    captured = []
    real_tt = ab.teacher_targets
    monkeypatch.setattr(ab, "teacher_targets", lambda model, groups, *a: captured.append(groups) or real_tt(model, groups, *a))

    class Tok:
        add_bos, bos_id, stop_ids, chat_format = True, 1, {2}, None

        def encode(self, text, bos=False):
            return ([1] if bos else []) + [3 + (ord(c) % 90) for c in text]

    m = lora_model()
    ab.absorb_text(m, Tok(), "some text " * 8, AbsorbConfig(steps=1, chunk=40, sync_len=20, gen_tokens=8, probes=""))
    prefix, x, ys = captured[0][0]
    assert prefix == [1] and x[0] != 1
    t = real_tt(m, captured[0], True, False)
    assert (t.ids[:, 0] == 1).all()


def test_non_finite_loss_keeps_last_good_adapter(monkeypatch):
    m = lora_model()
    calls = {"n": 0}
    real = ab.sync_loss

    def flaky(model, t, cfg, *scales):
        calls["n"] += 1
        out = real(model, t, cfg, *scales)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(ab, "sync_loss", flaky)
    snapshots = []
    res = absorb_chunk(m, [([], ids(20, 1), [ids(10, 2)])], AbsorbConfig(steps=10, lr=1e-2),
                       log=lambda d: snapshots.append({k: v.clone() for k, v in lora_state_dict(m).items()}))
    # losses were finite for the states after 0, 1 and 2 updates; the state after update 3 gave
    # NaN, so the adapter goes back to the last state whose loss was finite (after update 2)
    assert res.stopped == "non-finite loss" and res.steps == 3 and len(res.losses) == 3
    for k, v in lora_state_dict(m).items():
        assert torch.equal(v, snapshots[1][k]) and not torch.equal(v, snapshots[2][k])
        assert torch.isfinite(v).all()


def test_absorbing_after_generating_in_the_same_process():
    """Generation (no-grad, cached RoPE tables) followed by absorption must not leak
    inference-mode tensors into autograd (absorb.py asks questions before absorbing)."""
    from nanoabsorber.sampling import generate

    m = lora_model()
    with torch.inference_mode():
        list(generate(m, [1, 2, 3], 4))
    list(generate(m, [1, 2, 3], 4))
    res = absorb_chunk(m, [([], ids(20, 1), [ids(10, 2)])], AbsorbConfig(steps=2, lr=1e-2))
    assert res.steps == 2


def test_cosine_schedule_decays_the_learning_rate_and_still_reduces_the_loss(monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    m = lora_model()
    res = absorb_chunk(m, [([], ids(30, 3), [ids(20, 4)])], AbsorbConfig(steps=4, lr=1e-2, schedule="cosine"))
    assert res.final_loss < res.first_loss
    assert seen == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * i / 4))
                                  for i in range(4)])
    with pytest.raises(ValueError, match="schedule"):
        AbsorbConfig(schedule="linear")


def test_automatic_lr_and_gen_tokens_depend_on_what_y_is_made_of():
    class Chat:
        chat_format = True

    class Raw:
        chat_format = False

    cfg = AbsorbConfig()
    auto = tuple(ab.AUTOMATIC)
    assert set(auto) == {"lr", "steps", "loss", "gen_tokens", "chunk", "sync_len", "batch_tokens", "teacher", "epochs"}
    assert all(getattr(cfg, k) is None for k in auto)                     # automatic
    probe, raw = cfg.resolved(True), cfg.resolved(False)
    assert [getattr(probe, k) for k in auto] == [ab.AUTOMATIC[k][0] for k in auto]
    assert [getattr(raw, k) for k in auto] == [ab.AUTOMATIC[k][1] for k in auto]
    assert (probe.lr, probe.steps, probe.loss, probe.gen_tokens) == (ab.PROBE_LR, ab.PROBE_STEPS, ab.PROBE_LOSS, 0)
    assert (raw.chunk, raw.sync_len, raw.batch_tokens) == (ab.RAW_CHUNK, ab.RAW_SYNC_LEN, 0)
    explicit = AbsorbConfig(lr=5e-4, steps=3, loss="mse", gen_tokens=7, chunk=64, sync_len=9, batch_tokens=0,
                            teacher="updated", epochs=0.0)
    assert explicit.resolved(True) == explicit.resolved(False) == explicit    # explicit wins
    assert ab.uses_chat_probes(Chat(), AbsorbConfig(probes="recite"))
    assert not ab.uses_chat_probes(Chat(), AbsorbConfig(probes=""))      # no probes: raw-text Y only
    assert not ab.uses_chat_probes(Raw(), AbsorbConfig(probes="recite"))  # not a chat model
    assert not ab.uses_chat_probes(Chat(), AbsorbConfig(probes="recite", objective="ntp"))
    assert ab.resolve_config(Raw(), cfg).lr == ab.RAW_TEXT_LR
    assert ab.resolve_config(Chat(), cfg).lr == ab.PROBE_LR
    with pytest.raises(ValueError, match="unknown probe"):
        ab.probe_kinds("recite,summary")



def test_base_teacher_ignores_the_lora_learned_so_far(monkeypatch):
    """teacher="base": the teacher's targets are the model without LoRA (the same as before any
    window), "updated": the model with it (Algorithm 2); the LoRA is back in place after."""
    from nanoabsorber.lora import lora_disabled, lora_modules

    torch.manual_seed(0)
    m = lora_model()
    for mod in lora_modules(m):                           # a LoRA already learned
        torch.nn.init.normal_(mod.lora_B, std=0.05)
    group = [([3], ids(20, 7), [ids(9, 8)])]
    with_lora = teacher_targets(m, group, True, False).hidden
    with lora_disabled(m):
        base = teacher_targets(m, group, True, False).hidden
    assert not torch.allclose(with_lora, base)
    torch.testing.assert_close(teacher_targets(m, group, True, False).hidden, with_lora)   # restored
    seen = []
    monkeypatch.setattr(ab, "teacher_targets", lambda model, groups, *a: seen.append(
        teacher_targets(model, groups, True, False).hidden) or teacher_targets(model, groups, *a))
    absorb_chunk(m, group, AbsorbConfig(steps=0, teacher="base", loss="l1"))
    absorb_chunk(m, group, AbsorbConfig(steps=0, teacher="updated", loss="l1"))
    torch.testing.assert_close(seen[0], base)
    torch.testing.assert_close(seen[1], with_lora)
    mods = lora_modules(m)
    mods[0].merge()
    with pytest.raises(ValueError, match="unmerge"):
        with lora_disabled(m):
            pass


def test_replay_only_windows_are_skipped_and_replay_adds_no_steps():
    # a window whose groups are all replayed passages is not trained (it would spend its steps on
    # a few old passages and forget the rest); elsewhere epochs count the new Y tokens only
    m = lora_model()
    new, old = ([], ids(20, 1), [ids(40, 2)]), ab.Replayed(([], ids(20, 3), [ids(200, 4)]))
    calls = []
    stream = ids(64, 5)

    def extra(ci, x):
        return [new, old] if ci == 0 else [old]
    cfg = AbsorbConfig(loss="l1", chunk=32, sync_len=0, gen_tokens=0, steps=50, epochs=2, batch_tokens=40,
                       lr=1e-3, probes="about")
    res = absorb_stream(m, stream, cfg, extra_ys=extra, log=calls.append)
    assert [r.stopped for r in res] == ["max steps", "nothing to absorb"]
    assert res[0].steps == 2            # 2 passes over the 40 new Y tokens at 40 per step (not over 240)
    assert res[0].y_tokens == 240 and res[1].steps == 0


def test_teacher_targets_mark_replayed_rows():
    # the replay split reads a per-row flag carried by the targets (groups with empty Y add no rows),
    # and a subset of rows keeps its flags
    m = lora_model()
    groups = [([], ids(8, 1), [ids(5, 2), []]), ab.Replayed(([], ids(8, 3), [[], ids(6, 4), ids(7, 5)])),
              ([], ids(8, 6), [ids(4, 7)])]
    t = ab.teacher_targets(m, groups, need_hidden=True, need_final=False)
    assert t.replayed == [False, True, True, False]
    assert t.mask.sum(1).tolist() == [5, 6, 7, 4]
    assert t.rows([3, 1]).replayed == [False, True]


@pytest.mark.parametrize("loss", ["hybrid", "l1"])
def test_lazy_replay_targets_train_the_same_adapter(monkeypatch, loss):
    # with the base teacher the replayed passages' targets are taught when a step draws them, not
    # kept for the window: the same steps, losses and adapter as keeping them all (the final loss
    # is then over the new rows only)
    new = [([1, 2], ids(8, k), [ids(10 + k, 10 + k), ids(6, 30 + k)]) for k in range(3)]
    old = [ab.Replayed(([1, 2], ids(8, 20 + k), [ids(9, 40 + k), [], ids(12, 60 + k)])) for k in range(6)]
    cfg = AbsorbConfig(loss=loss, steps=4, batch_tokens=48, lr=1e-2, replay_share=0.4, chunk=8, sync_len=0,
                       gen_tokens=0, teacher="base", micro_tokens=40)
    out, real = {}, ab.teacher_targets
    for lazy in (True, False):
        monkeypatch.setattr(ab, "LAZY_REPLAY", lazy)
        taught = []
        monkeypatch.setattr(ab, "teacher_targets", lambda m, gs, *a: taught.append(len(gs)) or real(m, gs, *a))
        m = lora_model()
        res = absorb_chunk(m, new + old, cfg)
        out[lazy] = (res, lora_state_dict(m), taught)
    (lz, lz_sd, lz_taught), (eg, eg_sd, eg_taught) = out[True], out[False]
    assert eg_taught == [9] and lz_taught[0] == 3 and len(lz_taught) == 1 + 4   # once, or per step
    assert lz.steps == eg.steps == 4 and lz.losses[:-1] == pytest.approx(eg.losses[:-1], rel=1e-6)
    for k in eg_sd:
        torch.testing.assert_close(lz_sd[k], eg_sd[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_replay_share_draws_each_step_from_both_pools(monkeypatch, share):
    # with --replay-share s every step takes about s of its Y tokens from the replayed rows (however
    # many there are) and the rest from the new ones; s = 0 keeps the old draw over all rows alike
    m = lora_model()
    new = [([], ids(8, k), [ids(10, 10 + k)]) for k in range(6)]                   # 6 new rows of 10
    old = [ab.Replayed(([], ids(8, 20 + k), [ids(10, 40 + k)])) for k in range(30)]  # 30 replayed rows
    steps = []
    real = ab._accumulate
    monkeypatch.setattr(ab, "_accumulate", lambda model, t, rows, cfg, backward:
                        (steps.append(list(rows)) if backward else None) or real(model, t, rows, cfg, backward))
    cfg = AbsorbConfig(loss="l1", steps=6, batch_tokens=40, lr=1e-3, replay_share=share, chunk=8, sync_len=0,
                       gen_tokens=0)
    absorb_chunk(m, new + old, cfg)
    assert len(steps) == 6
    for rows in steps:
        n_old = sum(r >= 6 for r in rows)
        assert n_old == math.ceil(share * 40 / 10) and len(rows) - n_old == math.ceil((1 - share) * 40 / 10)
    steps.clear()
    absorb_chunk(m, new + old, replace(cfg, replay_share=0.0))
    assert sum(r >= 6 for rows in steps for r in rows) > 0.6 * sum(map(len, steps))   # drawn alike: mostly old
