"""moerge serve: a real server on a free localhost port, driven by the official openai client (and raw
HTTP for the error cases), on the tiny base."""

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from moerge.eval import greedy
from moerge.lm import base as base_model
from moerge.serve import Server
from moerge.train.expert import load_expert, train_expert

PROMPTS = {"reverse": "reverse: hello=", "uppercase": "uppercase: world=", "novowels": "novowels: seasons="}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    for task in PROMPTS:
        train_expert(root / task, task=task, steps=20, n_train=128, batch_size=32, progress=False)
    return {t: root / t for t in PROMPTS}


@pytest.fixture(scope="module")
def server(experts):
    root = next(iter(experts.values())).parent
    with Server(experts=[str(p) for p in experts.values()], routers=["centroid", "arrow", "uniform"], max_batch=16,
                adapter_roots=[root]) as s:
        yield s


def client(s, key="unused") -> OpenAI:
    return OpenAI(base_url=s.url, api_key=key, max_retries=0)


def reference(expert_dir, prompt, n=12):
    """What moerge's own evaluator answers with the expert merged in (or the base alone)."""
    model, tok = load_expert(None, expert_dir) if expert_dir else base_model.load()
    return greedy(model, tok, [prompt], max_new_tokens=n)[0]


def ask(c, model, prompt, n=12, **kw):
    return c.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, **kw)


def ask_together(c, jobs, n=12) -> dict:
    """Each (model, prompt) job asked at once from its own thread: its greedy text."""
    got = {}
    threads = [threading.Thread(target=lambda j=j: got.__setitem__(j, ask(c, *j, n=n).choices[0].text)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_models_lists_the_base_the_experts_and_the_routers(server):
    models = {m.id: m for m in client(server).models.list().data}
    assert set(models) == {"moerge-tiny", "reverse", "uppercase", "novowels", "router:centroid", "router:arrow", "router:uniform"}
    assert models["reverse"].model_extra["parent"] == "moerge-tiny" and models["moerge-tiny"].model_extra["parent"] is None


def test_each_expert_and_the_base_answer_as_the_evaluator_does(server, experts):
    c = client(server)
    for task, prompt in PROMPTS.items():
        r = ask(c, task, prompt)
        assert r.choices[0].text == reference(experts[task], prompt)
        assert r.model_extra["experts"] == {task: 1.0} and r.model == task
        assert r.usage.prompt_tokens == len(prompt) + 1  # bos + one token per character
        assert r.usage.completion_tokens >= len(r.choices[0].text)
    r = ask(c, "moerge-tiny", PROMPTS["reverse"])
    assert r.choices[0].text == reference(None, PROMPTS["reverse"]) and r.model_extra["experts"] == {}


def test_concurrent_requests_share_batches_and_answer_as_alone(server):
    """Requests for different experts, routers and mixtures arrive together: they run as rows of one
    batch (joining between decoding steps) and each answer equals the one it gets alone."""
    c = client(server)
    jobs = [(m, p) for m in ("reverse", "uppercase", "novowels", "moerge-tiny", "router:centroid", "router:arrow")
            for p in PROMPTS.values()]
    alone = {j: ask(c, *j, n=16).choices[0].text for j in jobs}
    mix = c.completions.create(model="moerge-tiny", prompt=PROMPTS["reverse"], max_tokens=16, temperature=0,
                               extra_body={"mixture": {"reverse": 0.5, "uppercase": 0.5}}).choices[0].text
    before = server.engine.stats["max_batch_seen"]
    server.engine.stats["max_batch_seen"] = 0
    got, errors = {}, []
    barrier = threading.Barrier(len(jobs) + 1)

    def run(j):
        barrier.wait()
        try:
            got[j] = ask(c, *j, n=16).choices[0].text
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def run_mix():
        barrier.wait()
        got["mix"] = c.completions.create(model="moerge-tiny", prompt=PROMPTS["reverse"], max_tokens=16, temperature=0,
                                          extra_body={"mixture": {"reverse": 0.5, "uppercase": 0.5}}).choices[0].text

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs] + [threading.Thread(target=run_mix)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {j: got[j] for j in jobs} == alone and got["mix"] == mix
    assert server.engine.stats["max_batch_seen"] >= 4, "concurrent requests were served one at a time"
    server.engine.stats["max_batch_seen"] = max(before, server.engine.stats["max_batch_seen"])


def test_routers_pick_the_prompts_expert(server):
    c = client(server)
    for task, prompt in PROMPTS.items():
        r = ask(c, "router:centroid", prompt)
        assert max(r.model_extra["experts"], key=r.model_extra["experts"].get) == task
    uni = ask(c, "router:uniform", PROMPTS["reverse"]).model_extra["experts"]
    assert uni == pytest.approx({t: 1 / 3 for t in PROMPTS}, abs=1e-3)
    arrow = ask(c, "router:arrow", PROMPTS["reverse"]).model_extra["experts"]
    assert sum(arrow.values()) == pytest.approx(1.0, abs=1e-3) and len(arrow) >= 2  # per token: a spread over experts


def test_a_mixture_in_the_body_equals_that_weighted_merge(server, experts):
    from moerge.experts import load_adapter
    from moerge.io.source import open_source

    model, tok = base_model.load()
    sd = model.state_dict()
    base = {k: v.clone() for k, v in sd.items()}
    with torch.no_grad():
        for t, w in (("reverse", 0.7), ("uppercase", 0.3)):
            for name, u in load_adapter(experts[t], open_source(base_model.default_base())).updates.items():
                sd[name] += w * u.delta(base[name])
    model.load_state_dict(sd)
    want = greedy(model, tok, [PROMPTS["uppercase"]], max_new_tokens=12)[0]
    r = client(server).completions.create(model="moerge-tiny", prompt=PROMPTS["uppercase"], max_tokens=12, temperature=0,
                                          extra_body={"mixture": {"reverse": 0.7, "uppercase": 0.3}})
    assert r.choices[0].text == want and r.model_extra["experts"] == {"reverse": 0.7, "uppercase": 0.3}


def test_streaming_chat_stop_seed_and_n(server):
    c = client(server)
    whole = ask(c, "uppercase", PROMPTS["uppercase"]).choices[0].text
    chunks = list(c.completions.create(model="uppercase", prompt=PROMPTS["uppercase"], max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert chunks[-1].usage.completion_tokens >= len(whole) and chunks[-1].choices == []
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].model_extra["experts"] == {"uppercase": 1.0}
    # the raw stream is server-sent events ending in [DONE]
    with httpx.stream("POST", server.url + "/completions", json={"model": "uppercase", "prompt": PROMPTS["uppercase"],
                                                                  "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert all(x.startswith("data: ") for x in lines)
    # chat: the same answer as the completion on a template-less base
    chat = c.chat.completions.create(model="uppercase", messages=[{"role": "user", "content": PROMPTS["uppercase"]}],
                                     max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == whole and chat.choices[0].message.role == "assistant"
    streamed = c.chat.completions.create(model="uppercase", messages=[{"role": "user", "content": PROMPTS["uppercase"]}],
                                         max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == whole
    # stop strings cut the text before them; max_tokens ends with "length"
    if len(whole) >= 3:
        cut = c.completions.create(model="uppercase", prompt=PROMPTS["uppercase"], max_tokens=12, temperature=0, stop=[whole[2]])
        assert cut.choices[0].text == whole[: whole.index(whole[2])] and cut.choices[0].finish_reason == "stop"
    short = ask(c, "moerge-tiny", PROMPTS["reverse"], n=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    # sampling: the same seed gives the same text; n choices
    a = c.completions.create(model="reverse", prompt="reverse: abc=", max_tokens=10, temperature=1.5, seed=7, n=3)
    b = c.completions.create(model="reverse", prompt="reverse: abc=", max_tokens=10, temperature=1.5, seed=7, n=3)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and [x.index for x in a.choices] == [0, 1, 2]
    assert len({x.text for x in a.choices}) > 1  # different seeds per choice


def test_bad_requests_get_openai_errors(server):
    url = server.url

    def post(path, body, raw=False):
        r = httpx.post(url + path, content=body if raw else json.dumps(body), headers={"content-type": "application/json"})
        assert "Traceback" not in r.text
        return r.status_code, r.json()["error"]

    status, err = post("/completions", "{not json", raw=True)
    assert status == 400 and "not valid JSON" in err["message"]
    status, err = post("/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and err["code"] == "model_not_found" and "/v1/models" in err["message"]
    status, err = post("/completions", {"model": "reverse", "prompt": "x", "max_tokens": -3})
    assert status == 400 and err["param"] == "max_tokens"
    status, err = post("/completions", {"model": "reverse", "prompt": "x" * 400})
    assert status == 400 and err["code"] == "context_length_exceeded"
    status, err = post("/completions", {"model": "reverse", "prompt": "x", "max_tokens": 500})
    assert status == 400 and err["code"] == "context_length_exceeded" and "max_tokens" in err["message"]
    status, err = post("/completions", {"model": "reverse", "prompt": "x", "logprobs": 2})
    assert status == 400 and "logprobs" in err["message"]
    status, err = post("/completions", {"model": "router:phatgoose", "prompt": "x"})
    assert status == 404 and "--router" in err["message"]
    status, err = post("/completions", {"model": "moerge-tiny", "prompt": "x", "mixture": {"reverse": "lots"}})
    assert status == 400
    status, err = post("/completions", {"model": "moerge-tiny", "prompt": "x", "mixture": {"nobody": 1.0}})
    assert status == 404
    status, err = post("/chat/completions", {"model": "reverse", "messages": []})
    assert status == 400 and "messages" in err["message"]
    status, err = post("/chat/completions", {"model": "reverse", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert status == 400 and "text parts" in err["message"]
    with pytest.raises(openai.NotFoundError):
        ask(client(server), "nope", "x")


def test_adapters_load_and_unload_at_run_time(server, experts):
    c, url = client(server), server.url
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "rev2", "lora_path": str(experts["reverse"])})
    assert r.status_code == 200, r.text
    assert "rev2" in {m.id for m in c.models.list().data}
    assert ask(c, "rev2", PROMPTS["reverse"]).choices[0].text == ask(c, "reverse", PROMPTS["reverse"]).choices[0].text
    assert ask(c, "router:centroid", PROMPTS["uppercase"]).choices[0].text == ask(c, "uppercase", PROMPTS["uppercase"]).choices[0].text
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "rev2", "lora_path": str(experts["reverse"])})
    assert r.status_code == 409 and "already loaded" in r.json()["error"]["message"]
    ghost = str(experts["reverse"].parent / "no-such-adapter")
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "ghost", "lora_path": ghost})
    assert r.status_code == 400 and ghost in r.json()["error"]["message"]
    for outside in ("/no/such/adapter", str(experts["reverse"]) + "/../../.."):  # only from under --adapter-root
        r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "ghost", "lora_path": outside})
        assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "rev2"})
    assert r.status_code == 200 and "rev2" not in r.json()["experts"]
    with pytest.raises(openai.NotFoundError):
        ask(c, "rev2", PROMPTS["reverse"])
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "rev2"})
    assert r.status_code == 404


def test_auth_busy_and_disconnect(experts):
    with Server(experts=[str(experts["reverse"])], routers=["centroid"], api_key="sekret", max_concurrent=1) as s:
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").models.list()
        r = httpx.get(s.url + "/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert [m.id for m in client(s, "sekret").models.list().data][:2] == ["moerge-tiny", "reverse"]
        head = {"authorization": "Bearer sekret"}
        body = {"model": "moerge-tiny", "prompt": "reverse: a=", "max_tokens": 240, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/completions", json=body, headers=head) as stream:
            lines = stream.iter_lines()  # kept: a dropped line iterator closes the response
            next(lines)  # one request in flight, mid-generation: the limit
            s.engine.control(lambda: time.sleep(1.5))  # a slow model: the row stays in flight a while
            busy = httpx.post(s.url + "/completions", json=dict(body, stream=False), headers=head)
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        deadline = time.time() + 20  # the client went away mid-stream: its row is dropped, its slot freed
        while s.engine.health()["in_flight"] and time.time() < deadline:
            time.sleep(0.05)
        assert s.engine.health()["in_flight"] == 0 and s.engine.stats["cancelled"] >= 1
        assert ask(client(s, "sekret"), "reverse", PROMPTS["reverse"]).choices[0].finish_reason in ("stop", "length")


def test_a_library_server_picks_up_experts_added_later(experts, tmp_path):
    from moerge.library import Library

    lib = Library.init(tmp_path / "lib", base_model.default_base())
    lib.add(experts["reverse"], "rev")
    with Server(library=tmp_path / "lib", routers=["centroid"]) as s:
        c = client(s)
        assert {m.id for m in c.models.list().data} == {"base@1", "rev@1", "router:centroid"}
        assert ask(c, "rev", PROMPTS["reverse"]).model_extra["experts"] == {"rev@1": 1.0}
        lib.add(experts["uppercase"], "up")  # added while the server runs: the next request naming it finds it
        r = ask(c, "up", PROMPTS["uppercase"])
        assert r.choices[0].text == reference(experts["uppercase"], PROMPTS["uppercase"])
        assert max(ask(c, "router:centroid", PROMPTS["uppercase"]).model_extra["experts"].items(), key=lambda kv: kv[1])[0] == "up@1"


def test_serve_cli_refuses_bad_input_in_one_line(tmp_path, experts):
    from typer.testing import CliRunner

    from moerge.cli import app

    for args, needle in ((["--experts", str(tmp_path / "missing")], "missing"),
                         (["--experts", str(experts["reverse"]), "--router", "lorahub"], "lorahub"),
                         (["--experts", str(experts["reverse"]), "--router", "nosuch"], "nosuch"),
                         (["--experts", str(experts["reverse"]), "--router", "phatgoose"], "gates"),
                         (["--experts", str(experts["reverse"]), "--library", str(tmp_path)], "not both")):
        res = CliRunner().invoke(app, ["serve", *args, "--port", "0"])
        assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output, (args, res.output)


def test_ray_serve_replicas_answer_as_the_local_server(server, experts):
    """`moerge serve --ray`: the same app as two Ray Serve replicas on a local Ray."""
    pytest.importorskip("ray.serve")
    from ray import serve

    from moerge.serve import free_port, ray_serve

    want = {t: ask(client(server), t, p).choices[0].text for t, p in PROMPTS.items()}
    url = ray_serve.deploy(experts=[str(p) for p in experts.values()], routers=["centroid"], replicas=2, port=free_port(),
                           cpus_per_replica=0.5)
    try:
        c = client(argparse_ns(url))
        assert {t: ask(c, t, p).choices[0].text for t, p in PROMPTS.items()} == want
        assert max(ask(c, "router:centroid", PROMPTS["novowels"]).model_extra["experts"].items(), key=lambda kv: kv[1])[0] == "novowels"
        streamed = c.completions.create(model="uppercase", prompt=PROMPTS["uppercase"], max_tokens=12, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == want["uppercase"]
        r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": str(experts["reverse"])})
        assert r.status_code == 403 and "library" in r.json()["error"]["message"]
        assert serve.status().applications["moerge"].deployments["moerge"].replica_states == {"RUNNING": 2}
    finally:
        ray_serve.shutdown()
    import ray

    assert not ray.is_initialized()


def argparse_ns(url):
    class S:  # what client() reads from a server
        pass

    s = S()
    s.url = url
    return s


def test_speculative_decoding_with_a_draft_gives_the_same_greedy_text(server, experts, tmp_path):
    """--draft: the draft proposes, the served mixture checks; greedy answers are exactly those of plain
    decoding whatever the draft says (here the base drafts for its experts and routers too), and so
    with prompt lookup (--draft ngram)."""
    from moerge.errors import MoergeError
    from moerge.lm.tiny import make_vocab_model
    from moerge.serve import build

    c = client(server)
    jobs = [(m, p) for m in ("moerge-tiny", "reverse", "router:centroid", "router:arrow") for p in PROMPTS.values()]
    want = {j: ask(c, *j, n=24).choices[0].text for j in jobs}
    with Server(experts=[str(p) for p in experts.values()], routers=["centroid", "arrow"], draft=str(base_model.default_base()),
                draft_tokens=3) as s:
        d = client(s)
        got = ask_together(d, jobs, n=24)
        assert got == want
        st = s.engine.stats
        assert st["accepted"] > 0 and st["proposed"] > st["accepted"]  # the base agrees with itself, the experts differ
        a = d.completions.create(model="reverse", prompt="reverse: abc=", max_tokens=10, temperature=1.2, seed=3)
        b = d.completions.create(model="reverse", prompt="reverse: abc=", max_tokens=10, temperature=1.2, seed=3)
        assert a.choices[0].text == b.choices[0].text
    with Server(experts=[str(p) for p in experts.values()], routers=["centroid", "arrow"], draft="ngram", draft_tokens=3) as s:
        d = client(s)
        got = ask_together(d, jobs, n=24)
        assert got == want  # prompt lookup proposes, the served mixture decides: greedy text unchanged
        st = s.engine.stats
        assert st["speculative_steps"] > 0 and st["accepted"] > 0 and st["proposed"] > st["accepted"]
        assert s.engine.prefixes  # no draft model: the prefix cache stays on
    other = make_vocab_model(tmp_path / "other", ["<pad>", "<s>", "</s>", "<unk>", "a", "b"], seed=1)
    with pytest.raises(MoergeError, match="vocabulary"):
        build(experts=[str(experts["reverse"])], draft=str(other))


def test_prefix_cache_reuses_shared_starts_per_route_and_changes_no_answer(server, experts):
    """Prompts that start alike reuse the cached keys and values of that start, per expert or router;
    every greedy answer equals the one of a server without the cache; an adapter load clears it."""
    c = client(server)
    words = ["hello", "prefix", "caching", "abcdefg", "zz"]
    jobs = [(m, f"{t}: {w}=") for m in ("moerge-tiny", "reverse", "router:centroid", "router:arrow")
            for t in ("reverse", "uppercase") for w in words]
    before = dict(server.engine.prefixes.stats)
    got = {j: ask(c, *j).choices[0].text for j in jobs}
    stats = server.engine.prefixes.stats
    assert stats["reused_tokens"] - before["reused_tokens"] >= 8 * len(jobs) // 2  # most prompts reused a start
    with Server(experts=[str(p) for p in experts.values()], routers=["centroid", "arrow"], prefix_cache=0) as plain:
        assert {j: ask(client(plain), *j).choices[0].text for j in jobs} == got
        assert plain.engine.prefixes.stats["reused_tokens"] == 0
    assert len(server.engine.prefixes) > 0
    c.models.list()  # a look at the library that changes nothing keeps the cache
    assert len(server.engine.prefixes) > 0
    server.engine.control(server.engine.bank.rebuild).result(10)  # a changed bank (a load, an unload): dropped
    assert len(server.engine.prefixes) == 0


def test_prefix_cache_keeps_its_budget_and_routes_apart():
    from moerge.routing.prefix import PrefixCache

    kv = lambda n: ([torch.full((1, 2, n, 4), float(n))], [torch.zeros(1, 2, n, 4)])  # noqa: E731
    p = PrefixCache(40)
    p.insert(("a",), list(range(20)), *kv(20))
    assert p.lookup(("a",), list(range(12)) + [99, 98])[0] == 12
    assert p.lookup(("b",), list(range(20)))[0] == 0  # another route's keys and values never serve
    assert p.lookup(("a",), list(range(20)))[0] == 19  # the last prompt token is always computed
    assert p.lookup(("a",), list(range(5)) + [7] * 10)[0] == 0  # a start shorter than MIN_REUSE is recomputed
    p.insert(("a",), list(range(100, 120)), *kv(20))
    p.lookup(("a",), list(range(20)))  # the first entry used last: the second is evicted next
    p.insert(("b",), list(range(200, 215)), *kv(15))
    assert p.tokens <= 40 and len(p) == 2 and p.lookup(("a",), list(range(100, 120)))[0] == 0
    assert PrefixCache(0).lookup(("a",), list(range(20))) == (0, None) and not PrefixCache(0)


def test_base_embeddings_reusing_cached_starts_equal_the_full_forward():
    """The task routers' prompt embeddings (mean of the base's final hidden states) computed from a
    cached start plus the rest equal those of a full forward pass over each prompt."""
    from moerge.experts.embed import mean_pooled
    from moerge.lm.generate import encode_left_padded
    from moerge.routing import prefix

    model, tok = base_model.load()
    cache = prefix.PrefixCache(4096)
    batches = [[f"{t}: {w}=" for t in ("reverse", "uppercase")] for w in ("hello", "abc")] + \
              [["reverse: world=", "uppercase: seasons=", "novowels: x="]]
    reused = []
    for prompts in batches:
        ids, mask = encode_left_padded(tok, prompts)
        with torch.no_grad():
            want = mean_pooled(model, ids, mask)
            before = cache.stats["reused_tokens"]
            got = prefix.embed(model, cache, ids, mask, tok.pad_token_id)
        reused.append(cache.stats["reused_tokens"] - before)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert reused[0] == 0 and reused[1] >= 2 * 8 and reused[2] >= 2 * 8  # later prompts reuse their task's start
