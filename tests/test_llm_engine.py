"""The request core (`raas_batch.llm_engine.LLMEngine`): every request out exactly once, errors out
at the next step, abort leaves the engine reusable, timings from admission, generation_config
defaults for unset sampling fields, and the one prompt validator."""

import itertools
import json
import shutil

import pytest

from raas_batch import LLM, SamplingParams
from raas_batch.engine.sequence import Sequence
from raas_batch.llm_engine import fill_completion
from raas_batch.outputs import CompletionOutput
from raas_batch.prompts import check_prompt, text_as_chat


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """A tiny Llama whose generation_config.json asks for temperature 0.6 and top_p 0.95."""
    path = tmp_path_factory.mktemp("tiny-gen") / "model"
    shutil.copytree(tiny_model_dir("llama"), path)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(temperature=0.6, top_p=0.95)
    (path / "generation_config.json").write_text(json.dumps(config))
    return LLM(model=str(path), device="cpu", dtype="fp32", max_num_seqs=3)


def test_every_request_comes_out_once_errors_at_the_next_step(tiny):
    core = tiny.llm_engine
    params = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    core.add_request("bad", "   ", params)
    core.add_request("a", {"prompt_token_ids": [5, 6, 7]}, params)
    finished, tokens = core.step()
    assert [k for k, _ in finished] == ["bad"] and tokens == 1  # the prefill of "a" ran too
    assert finished[0][1].outputs[0].error == "the prompt is empty"
    seen = []
    for i in range(5):  # more requests arrive while "a" decodes (3 slots: some wait)
        core.add_request(i, {"prompt_token_ids": [8 + i, 9]}, SamplingParams(max_new_tokens=2 + i, temperature=0,
                                                                            ignore_eos=True, n=2))
    while core.has_unfinished_requests():
        seen += [k for k, _ in core.step()[0]]
    assert sorted(seen, key=str) == [0, 1, 2, 3, 4, "a"] and not tiny.engine.has_work()


def test_abort_leaves_the_engine_idle_and_reusable(tiny):
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    ref = tiny.generate([{"prompt_token_ids": [11, 12, 13]}], params)[0].outputs[0].token_ids
    stream = tiny.generate_stream((i, {"prompt_token_ids": [20 + i, 21]}, params) for i in range(6))
    next(stream)  # the first request done; others mid-decode, some waiting
    stream.close()
    engine = tiny.engine
    assert not engine.has_work() and not tiny.llm_engine.has_unfinished_requests()
    assert engine.pool.num_free == engine.pool.num_pages - 1  # only the engine's scratch page is held
    assert sorted(engine.scheduler._free_slots) == list(range(engine.scheduler.max_num_seqs))
    assert tiny.generate([{"prompt_token_ids": [11, 12, 13]}], params)[0].outputs[0].token_ids == ref


def test_generation_config_fills_unset_sampling_fields(tiny):
    defaults = tiny.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_new_tokens) == (0.6, 0.95, 0, 256)
    prompt = {"prompt_token_ids": [30, 31, 32]}
    unset = tiny.generate(prompt, SamplingParams(max_tokens=12, seed=5, ignore_eos=True))[0].outputs[0]
    given = tiny.generate(prompt, SamplingParams(max_tokens=12, seed=5, ignore_eos=True, temperature=0.6,
                                                 top_p=0.95))[0].outputs[0]
    hot = tiny.generate(prompt, SamplingParams(max_tokens=12, seed=5, ignore_eos=True, temperature=1.0,
                                               top_p=1.0))[0].outputs[0]
    assert unset.token_ids == given.token_ids != hot.token_ids
    greedy = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0)
    assert tiny.generate(prompt, greedy)[0].outputs[0].token_ids == tiny.generate(prompt, greedy)[0].outputs[0].token_ids


def test_generation_config_keys_not_applied_are_named_once(tmp_path, caplog):
    """A generation_config that sets what vLLM would apply and we do not (Qwen2.5-Instruct's repetition_penalty 1.05,
    a min_p) gets one warning naming each key and value; neutral values and the keys we apply are silent."""
    from raas_batch.generation_config import read_generation_defaults

    model = tmp_path / "model"
    model.mkdir()
    path = model / "generation_config.json"
    path.write_text(json.dumps({"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                                "min_p": 0.05, "do_sample": True}))
    with caplog.at_level("WARNING", logger="raas_batch.generation_config"):
        assert read_generation_defaults(str(model)) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "repetition_penalty=1.05" in warnings[0] and "min_p=0.05" in warnings[0]
    assert "vLLM would" in warnings[0] and str(path) in warnings[0]
    caplog.clear()
    path.write_text(json.dumps({"temperature": 0.6, "repetition_penalty": 1.0, "min_p": 0.0}))
    with caplog.at_level("WARNING", logger="raas_batch.generation_config"):
        assert read_generation_defaults(str(model)) == {"temperature": 0.6}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    path.write_text("[1, 2]")  # valid JSON, not a mapping: ignored with a warning, not an AttributeError
    with caplog.at_level("WARNING", logger="raas_batch.generation_config"):
        assert read_generation_defaults(str(model)) == {}
    assert "not a JSON object" in caplog.records[-1].getMessage()


def test_sampling_params_read_back_what_was_set():
    p = SamplingParams(max_tokens=7)
    assert p.max_tokens == p.max_new_tokens == 7 and p.unset() == ["temperature", "top_p", "top_k"]
    assert SamplingParams(max_new_tokens=9).max_tokens == 9 and SamplingParams().max_tokens is None
    with pytest.raises(ValueError, match="disagree"):
        SamplingParams(max_tokens=7, max_new_tokens=8)
    full = p.with_defaults({"temperature": 0.6, "top_k": 20})
    assert (full.max_new_tokens, full.temperature, full.top_p, full.top_k) == (7, 0.6, 1.0, 20)
    assert p.temperature is None  # with_defaults copies


def test_timings_are_measured_from_admission():
    seq = Sequence(request_idx=0, sample_idx=0, prompt_token_ids=[1], params=SamplingParams(max_new_tokens=2),
                   seed_key=0, seed=0, max_new_tokens=2, t_arrival=100.0)
    seq.output_token_ids, seq.finish_reason = [5, 6], "length"
    seq.t_admitted, seq.t_first_token, seq.t_finish = 160.0, 161.5, 164.0
    out = CompletionOutput(index=0)
    fill_completion(out, seq, None)
    assert (out.ttft_s, out.e2e_s) == (1.5, 4.0)


@pytest.mark.parametrize("value, fragment", [
    (None, "null"), ("  ", "empty"), ([], "empty list"), (3.5, "is a float"), ({"x": 1}, "prompt_token_ids"),
    ({"prompt_token_ids": [1, -2]}, "non-negative"), ({"prompt_token_ids": []}, "no tokens"),
    ([{"content": "x"}], "'role' and 'content'"), (["hi"], "message 0 is a str"),
    ([{"role": "user", "content": 3}], "content of type int"), ([{"role": " ", "content": "x"}], "role ' '"),
    ([{"role": "user", "content": " "}], "every message has empty content"),
])
def test_one_validator_names_the_problem(value, fragment):
    normal, error = check_prompt(value)
    assert normal is None and fragment in error


def test_valid_prompts_in_normal_form_and_text_as_chat():
    assert check_prompt("hi") == ("hi", None)
    assert check_prompt([3, 4]) == ([3, 4], None) == check_prompt({"prompt_token_ids": (3, 4)})
    messages = [{"role": "user", "content": "hi", "extra": 1}]
    assert check_prompt(messages) == ([{"role": "user", "content": "hi"}], None)
    assert text_as_chat("hi") == [{"role": "user", "content": "hi"}]
    assert text_as_chat("hi", "be brief") == [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"}]
    assert text_as_chat(messages, "be brief")[0] == {"role": "system", "content": "be brief"}
    system = [{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}]
    assert text_as_chat(system, "be brief") == system
    for unchanged in ("  ", [1, 2], None, [{"role": "user"}, "junk"]):
        assert text_as_chat(unchanged, "be brief") == unchanged


def test_texts_of_a_step_decoded_together_equal_one_by_one(smollm_tokenizer):
    """Sequences finishing in one step are decoded in one parallel batch: the same texts as decoding each
    (special tokens skipped); {} when the tokenizer has no batch decode that promises that."""
    import random

    from raas_batch.llm_engine import decode_texts

    tok = smollm_tokenizer
    rng = random.Random(0)
    special = tok.all_special_ids
    seqs = [_seq([rng.choice(special) if rng.random() < 0.05 else rng.randrange(len(tok))
                  for _ in range(rng.randrange(0, 300))]) for _ in range(12)]
    texts = decode_texts(tok, seqs)
    assert len(texts) == 12
    for s in seqs:
        assert texts[id(s)] == tok.decode(s.output_token_ids, skip_special_tokens=True)
    one = seqs[0]
    assert decode_texts(tok, [one]) == {id(one): tok.decode(one.output_token_ids, skip_special_tokens=True)}
    assert decode_texts(None, seqs) == {}


def _seq(ids):
    return Sequence(request_idx=0, sample_idx=0, prompt_token_ids=[1], params=SamplingParams(), seed_key=0, seed=0,
                    max_new_tokens=10**6, output_token_ids=list(ids))


def _wordpiece_and_metaspace_tokenizers():
    """Two small fast tokenizers whose decoders are not additive at every token boundary: WordPiece joins
    tokens with spaces (except ## pieces), Metaspace turns a leading \u2581 into a space and strips the
    text's first one."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = ["the", "cat", "##s", "sat", "##ting", "on", "mat", "\u2581the", "\u2581cat", "s", "\u2581on", "ing", "\u2581"]
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    made = []
    for decoder in (decoders.WordPiece(), decoders.Metaspace()):
        t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        t.decoder = decoder
        made.append(PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", clean_up_tokenization_spaces=False))
    return made


def _grow(tok, seqs, rng, pieces, rest):
    """Each sequence gets random tokens, a special token, or the tokens of a text with multi-byte
    characters: whole, or cut so that a character's first tokens end this growth and the rest starts the
    next (rest: id(seq) -> those tokens)."""
    special = tok.all_special_ids
    for s in seqs:
        s.output_token_ids += rest.pop(id(s), [])
        r = rng.random()
        if pieces and r < 0.4:
            p = rng.choice(pieces)
            if r < 0.2 and len(p) > 1:
                k = rng.randrange(1, len(p))
                p, rest[id(s)] = p[:k], p[k:]
            s.output_token_ids += p
        elif r < 0.45 and special:
            s.output_token_ids.append(rng.choice(special))
        else:
            s.output_token_ids += [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))]


def test_texts_decoded_while_running_equal_the_whole_decode(smollm_tokenizer, monkeypatch):
    """advance_texts extends running sequences' texts in chunks; with the rest decoded at the end the
    text is exactly tokenizer.decode of all tokens, for a byte-level BPE (UTF-8 characters split over
    byte tokens), WordPiece and Metaspace decoders. The seam check is what keeps it exact: it refuses
    some seams, and without it (SEAM_TOKENS 0: every seam taken) the texts differ."""
    import random

    from raas_batch import llm_engine
    from raas_batch.llm_engine import advance_texts, decode_texts, text_backend

    byte_level = smollm_tokenizer
    chars = [byte_level.encode(x, add_special_tokens=False) for x in ("日本語のテキスト", "😀👍🏽", "naïve café", " the")]
    for tok in (byte_level, *_wordpiece_and_metaspace_tokenizers()):
        backend = text_backend(tok)
        assert backend is not None
        for seam in (llm_engine.SEAM_TOKENS, 0):
            monkeypatch.setattr(llm_engine, "SEAM_TOKENS", seam)
            rng = random.Random(3)
            seqs = [_seq([]) for _ in range(6)]
            refused, rest = 0, {}
            for _ in range(60):
                _grow(tok, seqs, rng, chars if tok is byte_level else None, rest)
                before = [s.text_upto for s in seqs]
                advance_texts(backend, seqs)
                refused += sum(s.text_upto == b and len(s.output_token_ids) - seam - b >= llm_engine.TEXT_MIN_TOKENS
                               for s, b in zip(seqs, before))
            texts = decode_texts(tok, seqs)
            exact = [texts[id(s)] == tok.decode(s.output_token_ids, skip_special_tokens=True) for s in seqs]
            assert all(s.text_upto > 0 for s in seqs)
            if seam:
                assert all(exact) and refused > 0, (tok.backend_tokenizer.decoder, refused)
            else:
                assert not all(exact), tok.backend_tokenizer.decoder


def test_engine_decodes_texts_while_running(tiny, monkeypatch):
    """Through the request core: texts are extended during the run (the decoded prefix covers nearly
    every token when the rows finish) and each completion's text is the decode of its tokens."""
    from raas_batch import llm_engine

    tok = tiny.tokenizer
    seen = []
    real = llm_engine.decode_texts

    def spy(tokenizer, seqs):
        seen.extend(s.text_upto for s in seqs)
        return real(tokenizer, seqs)

    monkeypatch.setattr(llm_engine, "decode_texts", spy)
    outs = tiny.generate([{"prompt_token_ids": [30 + i, 31]} for i in range(3)],
                         SamplingParams(max_new_tokens=150, temperature=1.0, seed=1, ignore_eos=True))
    slack = llm_engine.TEXT_MIN_TOKENS + llm_engine.SEAM_TOKENS + 3  # at most one turn's tokens wait
    assert len(seen) == 3 and all(upto >= 150 - slack for upto in seen), seen
    for out in outs:
        c = out.outputs[0]
        assert len(c.token_ids) == 150 and c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_the_texts_worker_ends_with_its_engine(smollm_tokenizer):
    """The worker thread that extends texts starts with the first job and ends when its LLMEngine is gone."""
    import gc
    import threading
    from types import SimpleNamespace

    from raas_batch.llm_engine import LLMEngine

    def workers():
        return {t for t in threading.enumerate() if t.name.startswith("raas-texts")}

    before = workers()
    seqs = [_seq(list(range(100, 200)))]
    core = LLMEngine(SimpleNamespace(scheduler=SimpleNamespace(running=seqs, waiting=[])), smollm_tokenizer,
                     max_model_len=10**6, seed_key=lambda seed, j: 0)
    core._advance_some_texts()
    core._text_job.result()
    (mine,) = workers() - before
    assert seqs[0].text_upto > 0
    del core
    gc.collect()
    mine.join(timeout=10)
    assert not mine.is_alive()


def test_prompts_prepared_together_equal_one_by_one(smollm_tokenizer):
    """`prepare_many` (a batch of requests tokenized in one call, what generate_stream hands the core) gives
    each prompt what the tokenizer gives it alone: strings with the special tokens, chats through the template
    without them, token ids as they are, and each bad or too long prompt its own error; a text that breaks the
    batch call is tokenized on its own, so only its row gets the error."""
    from types import SimpleNamespace

    from raas_batch.llm_engine import LLMEngine

    tok = smollm_tokenizer
    engine = SimpleNamespace(scheduler=SimpleNamespace(running=[], waiting=[]))
    core = LLMEngine(engine, tok, max_model_len=64, seed_key=lambda seed, j: 0)
    chat = [{"role": "user", "content": "How many legs do 3 spiders have?"}]
    prompts = ["The capital of France is", chat, [5, 6, 7], {"prompt_token_ids": [9, 8]}, None, "  ", [],
               "word " * 80, [{"role": "user", "content": "Name a prime."}], "Once upon a time"]
    got = core.prepare_many(prompts)
    assert got == [core.prepare(p) for p in prompts]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert got[0] == ("The capital of France is", tok.encode("The capital of France is"), None)
    assert got[1] == (text, tok.encode(text, add_special_tokens=False), None)
    assert got[2][1:] == ([5, 6, 7], None) and got[3][1:] == ([9, 8], None)
    assert [g[2] for g in got[4:7]] == ["the prompt is null", "the prompt is empty",
                                        "the prompt is an empty list of messages"]
    assert "but the model's context is 64" in got[7][2] and got[8][2] is None and got[9][2] is None

    class Fragile:  # the tokenizer, but any call that sees "BOOM" raises
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, texts, **kw):
            if any("BOOM" in t for t in texts):
                raise ValueError("cannot encode BOOM")
            return tok(texts, **kw)

        def encode(self, text, **kw):
            if "BOOM" in text:
                raise ValueError("cannot encode BOOM")
            return tok.encode(text, **kw)

    core.tokenizer = Fragile()
    mixed = core.prepare_many(["fine text", "BOOM here", "also fine"])
    assert mixed[0] == got_alone(core, "fine text") and mixed[2] == got_alone(core, "also fine")
    assert mixed[1] == (None, [], "the prompt could not be tokenized (ValueError: cannot encode BOOM)")


def got_alone(core, prompt):
    return prompt, core.tokenizer.encode(prompt), None


def test_prefill_hands_the_kernel_its_longest_prompt(tiny, monkeypatch):
    """Every layer's prefill attention gets the batch's longest prompt from the host (the Triton kernel
    sizes its grid with it, and would otherwise read it back from cu_seqlens: a host sync a layer)."""
    ops = tiny.engine.runner.ops
    op, seen = ops.prefill_attention, []

    def watched(q, k, v, cu, scale, **kw):
        seen.append((cu.tolist(), kw.get("max_seqlen")))
        return op(q, k, v, cu, scale, **kw)

    monkeypatch.setattr(ops, "prefill_attention", watched)
    tiny.generate([{"prompt_token_ids": [5] * 3}, {"prompt_token_ids": [6] * 7}, {"prompt_token_ids": [7] * 2}],
                  SamplingParams(max_new_tokens=1, temperature=0))
    assert seen and all(m == max(b - a for a, b in itertools.pairwise(cu)) for cu, m in seen)
    assert max(m for _, m in seen) == 7
