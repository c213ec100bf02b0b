"""moerge serve under faults: every admitted request ends (its tokens or an OpenAI error), ``in_flight``
returns to its true value, and the next request succeeds. Real servers on free localhost ports, real
HTTP; faults are injected into the engine's prefill, decode, routing and adapter loading while several
requests are in flight; bad requests are refused at the door."""

import json
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from moerge.serve import Server, free_port
from moerge.train.expert import train_expert

PROMPTS = {"reverse": "reverse: hello=", "uppercase": "uppercase: world="}
WAIT = 60  # seconds a client waits at most: a request that hangs fails the test instead of hanging it


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    for task in PROMPTS:
        train_expert(root / task, task=task, steps=6, n_train=32, batch_size=16, progress=False)
    return {t: root / t for t in PROMPTS}


@pytest.fixture(scope="module")
def server(experts):
    with Server(experts=[str(p) for p in experts.values()], routers=["centroid", "arrow"], max_batch=8,
                adapter_roots=[next(iter(experts.values())).parent]) as s:
        yield s


def post(s, body: dict, path: str = "/completions", **kw) -> httpx.Response:
    return httpx.post(s.url + path, json=body, timeout=WAIT, **kw)


def body(model="reverse", prompt=PROMPTS["reverse"], n=8, **kw) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, **kw}


def settled(s, timeout: float = 10) -> dict:
    """The engine's health once nothing is in flight (or after ``timeout``)."""
    deadline = time.time() + timeout
    while s.engine.health()["in_flight"] and time.time() < deadline:
        time.sleep(0.02)
    return s.engine.health()


def serves(s) -> None:
    """The server still answers a plain request, as it did before any fault."""
    r = post(s, body())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def stream_lines(s, b: dict, started: threading.Event | None = None) -> list[dict | str]:
    """A streamed request's events: parsed chunks, errors as {"error": ...}, and "[DONE]"."""
    out = []
    with httpx.stream("POST", s.url + "/completions", json=dict(b, stream=True), timeout=WAIT) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            out.append("[DONE]" if data == "[DONE]" else json.loads(data))
            if started is not None:
                started.set()
    return out


class Fault:
    """Wraps an engine or bank method: raises ``exc`` the next ``times`` calls (or whenever ``when(args)``)."""

    def __init__(self, obj, name, *, times=0, when=None, exc=RuntimeError("injected fault")):
        self.obj, self.name, self.times, self.when, self.exc = obj, name, times, when, exc
        self.orig = getattr(obj, name)
        self.calls = 0

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.when is not None and self.when(*args, **kw):
            raise self.exc
        if self.times > 0:
            self.times -= 1
            raise self.exc
        return self.orig(*args, **kw)

    def __enter__(self):
        setattr(self.obj, self.name, self)
        return self

    def __exit__(self, *exc):
        if self.name in vars(self.obj):
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.orig)


def run_all(jobs, workers=8):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda f: f(), jobs))


def test_a_seed_past_64_bits_is_refused_at_the_door_and_cannot_lock_clients_out(server):
    """The issue's reproduction: 70 such requests (more than --max-concurrent's 64) are each a 400, and
    a good request is served after them; a huge seed that reaches the engine anyway is served."""
    bad = body(model="moerge-tiny", prompt="abc", n=4, seed=99999999999999999999)
    codes = run_all([lambda: post(server, bad).status_code] * 70)
    assert set(codes) == {400}
    r = post(server, bad)
    assert r.json()["error"]["param"] == "seed" and "Traceback" not in r.text
    assert settled(server)["in_flight"] == 0
    serves(server)
    ok = post(server, body(seed=2**63 - 1, temperature=1.0))  # the largest accepted seed, plus n's offsets
    assert ok.status_code == 200, ok.text


def test_a_fault_in_prefill_fails_only_the_request_it_belongs_to(server):
    """Prefill fails for the prompts containing BOOM; the other rows admitted in the same step are
    prefilled again one by one and answer exactly as alone."""
    goods = [body(m, p, n=12) for m in ("reverse", "uppercase", "moerge-tiny", "router:centroid") for p in PROMPTS.values()]
    alone = [post(server, g).json()["choices"][0]["text"] for g in goods]
    before = server.engine.stats["faults"]
    bad = body(prompt="reverse: BOOM=", n=12)
    with Fault(server.engine, "_prefill", when=lambda rows: any("BOOM" in s.prompt_text for s in rows)):
        got = run_all([lambda g=g: post(server, g) for g in goods] + [lambda: post(server, bad)] * 3, workers=12)
    assert [r.json()["choices"][0]["text"] for r in got[:len(goods)]] == alone
    for r in got[len(goods):]:
        err = r.json()["error"]
        assert r.status_code == 500 and err["type"] == "server_error" and "RuntimeError" in err["message"]
        assert "Traceback" not in r.text and "injected" not in r.text  # the detail stays in the server's log
    assert server.engine.stats["faults"] >= before + 3
    assert settled(server)["in_flight"] == 0
    serves(server)


def test_a_fault_in_decode_ends_the_running_rows_with_500_and_nothing_else(server):
    results = []

    def streams():
        b = body("uppercase", n=200, ignore_eos=True)
        return run_all([lambda: stream_lines(server, b) for _ in range(4)], workers=4)

    t = threading.Thread(target=lambda: results.extend(streams()))
    t.start()
    deadline = time.time() + WAIT
    while len(server.engine.running) < 4 and time.time() < deadline:  # all four are decoding
        time.sleep(0.01)
    with Fault(server.engine, "_decode", times=1):
        t.join(WAIT)
    assert not t.is_alive() and len(results) == 4
    for events in results:  # each stream: some text, then one error event, no [DONE]
        assert events[-1] != "[DONE]" and events[-1]["error"]["type"] == "server_error"
    assert settled(server)["in_flight"] == 0 and not server.engine.running
    serves(server)


def test_a_fault_in_routing_fails_its_requests_and_the_router_serves_again(server):
    """An example-level router that fails (at admission, in prefill) costs its own requests only; a
    token-level router that fails inside the forward pass costs its requests and any decoding in the
    same step."""
    alone = post(server, body("reverse", n=12)).json()["choices"][0]["text"]
    centroid, arrow = server.engine.bank.routers["centroid"], server.engine.bank.routers["arrow"]
    others = [lambda: post(server, body("reverse", n=12))] * 4
    with Fault(centroid, "example_weights", when=lambda *a, **k: True):
        got = run_all([lambda: post(server, body("router:centroid", n=12))] * 2 + others)
    assert [r.status_code for r in got] == [500] * 2 + [200] * 4
    assert all(r.json()["choices"][0]["text"] == alone for r in got[2:])
    with Fault(arrow, "token_weights", when=lambda *a, **k: True):
        got = run_all([lambda: post(server, body("router:arrow", n=12))] * 2 + others)
    assert [r.status_code for r in got[:2]] == [500] * 2
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == alone or r.status_code == 500 for r in got[2:])
    assert settled(server)["in_flight"] == 0
    for model in ("router:centroid", "router:arrow"):
        r = post(server, body(model, PROMPTS["uppercase"]))
        assert r.status_code == 200, r.text


def test_a_fault_while_loading_an_adapter_is_a_500_and_the_requests_in_flight_go_on(server, experts):
    b = body("reverse", n=150, ignore_eos=True)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, server, b) for _ in range(3)]
        deadline = time.time() + WAIT
        while len(server.engine.running) < 3 and time.time() < deadline:
            time.sleep(0.01)
        with Fault(server.engine.bank, "load_folder", times=1, exc=OSError("disk gone")):
            r = post(server, {"lora_name": "up2", "lora_path": str(experts["uppercase"])}, "/load_lora_adapter")
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "Traceback" not in r.text
        answers = [f.result(WAIT) for f in futures]
    assert all(a.status_code == 200 and a.json()["usage"]["completion_tokens"] == 150 for a in answers)
    assert "up2" not in server.engine.bank.names and settled(server)["in_flight"] == 0
    r = post(server, {"lora_name": "up2", "lora_path": str(experts["uppercase"])}, "/load_lora_adapter")
    assert r.status_code == 200  # the same load, fault gone
    assert post(server, {"lora_name": "up2"}, "/unload_lora_adapter").status_code == 200


def test_a_client_leaving_mid_stream_frees_its_slot_and_the_others_finish(server):
    b = body("reverse", n=120, ignore_eos=True, stream=True)

    def leaves():
        with httpx.stream("POST", server.url + "/completions", json=b, timeout=WAIT) as r:
            lines = r.iter_lines()
            next(lines)  # one chunk, then the client is gone

    staying = [lambda: stream_lines(server, dict(b, max_tokens=80)) for _ in range(3)]
    got = run_all([leaves] * 3 + staying, workers=6)
    for events in got[3:]:
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))
        assert len(text) > 0
    h = settled(server)
    assert h["in_flight"] == 0 and h["cancelled"] >= 3
    serves(server)


def test_repeated_faults_make_health_degraded(experts):
    with Server(experts=[str(experts["reverse"])], routers=[]) as s:
        assert httpx.get(s.url.removesuffix("/v1") + "/health").json()["status"] == "ok"
        with Fault(s.engine, "_prefill", exc=MemoryError("out of memory"), times=3):
            codes = [post(s, body()).status_code for _ in range(3)]
        assert codes == [500] * 3
        h = httpx.get(s.url.removesuffix("/v1") + "/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded" and h.json()["faults"] == 3
        assert "MemoryError" in h.json()["last_fault"] and h.json()["in_flight"] == 0
        serves(s)


def test_a_request_past_its_deadline_is_a_504_and_frees_its_slot():
    """The worker stalls (a slow step): requests waiting on it and on a control answer 504 at the
    deadline, count no more, and requests after the stall are served."""
    with Server(request_timeout=1.0, max_concurrent=2) as s:
        s.engine.control(lambda: time.sleep(3))  # the worker is stuck for 3 s
        t0 = time.time()
        got = run_all([lambda: post(s, body("moerge-tiny")), lambda: stream_lines(s, body("moerge-tiny")),
                       lambda: httpx.get(s.url + "/models", timeout=WAIT)])
        assert time.time() - t0 < 2.8
        plain, streamed, models = got
        assert plain.status_code == 504 and plain.json()["error"]["code"] == "timeout"
        assert "--request-timeout" in plain.json()["error"]["message"]
        assert streamed[-1]["error"]["code"] == "timeout"
        assert models.status_code == 503
        assert s.engine.health()["in_flight"] == 0  # freed at the deadline, not when the worker comes back
        assert s.engine.stats["timeouts"] == 2
        time.sleep(2.2)
        r = post(s, body("moerge-tiny"))
        assert r.status_code == 200 and settled(s)["in_flight"] == 0


def test_closing_the_engine_answers_every_request_in_flight():
    with Server() as s:
        b = body("moerge-tiny", n=200, ignore_eos=True)
        with ThreadPoolExecutor(3) as pool:
            s.engine.control(lambda: time.sleep(0.5))  # they queue behind a slow step
            futures = [pool.submit(post, s, b) for _ in range(3)]
            time.sleep(0.2)
            s.engine.close()
            answers = [f.result(WAIT) for f in futures]
        assert [a.status_code for a in answers] == [503] * 3 and s.engine.in_flight == 0
        assert "shut down" in answers[0].json()["error"]["message"]
        r = post(s, b)
        assert r.status_code == 503 and s.engine.health()["status"] in ("draining", "down")


def test_bad_fields_are_refused_at_the_door_with_their_name(server):
    def err(b, path="/completions"):
        r = post(server, b, path)
        assert 400 <= r.status_code < 500 and "Traceback" not in r.text, (b, r.text)
        return r.json()["error"]

    e = err(body(max_token=5))
    assert e["param"] == "max_token" and "did you mean 'max_tokens'" in e["message"] and e["code"] == "unknown_parameter"
    assert "'temperature'" in err(body(temprature=0.5))["message"]
    assert "mixture" in err(body(frobnicate=1))["message"]  # no close match: the extensions are listed
    assert "max_tokens" in err({"model": "reverse", "messages": [{"role": "user", "content": "x"}], "max_tokn": 3},
                               "/chat/completions")["message"]
    assert err(body(prompt=[1, 2, 10**9]))["param"] == "prompt"
    assert err(body(prompt=[-1]))["param"] == "prompt"
    assert err(body(temperature="NaN"))["param"] == "temperature"
    assert err(body(best_of=3))["message"].startswith("best_of")
    assert err(dict(body(), n=17))["param"] == "n"
    assert err(body(stop=["x" * 300]))["param"] == "stop"
    assert err({"model": "reverse", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
               "/chat/completions")["message"].startswith("response_format")
    # a field of several shapes says which it takes (not the shape names pydantic tried)
    assert err(body(prompt=5))["message"] == "prompt: give a string, a list of strings, a list of token ids or a list of token-id lists"
    assert err(body(stop=5)) == err(body(stop=5)) and err(body(stop=5))["param"] == "stop"
    assert err(body(prompt=[[1, 2], [10**7]]))["message"].startswith("prompt: token id 10000000")
    assert err(body(logprobs=5))["param"] == "logprobs"  # what is not supported is named, in the message and param
    e = err(body("reverse", mixture={"uppercase": 1.0}))
    assert e["param"] == "mixture" and "base" in e["message"]  # a mixture is sent with the base as the model
    assert err(body("moerge-tiny", mixture={"revers": 1.0}))["param"] == "mixture"
    e = err({"lora_name": "a", "lora_pth": "x"}, "/load_lora_adapter")
    assert "did you mean 'lora_path'" in e["message"]
    assert "the base" in err({"lora_name": "moerge-tiny"}, "/unload_lora_adapter")["message"]
    assert "a router" in err({"lora_name": "router:centroid"}, "/unload_lora_adapter")["message"]
    # OpenAI's other shapes: prompts of token ids, one model by id
    r = post(server, body(prompt=[[1, 60, 61], [1, 62]], n=3))
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert httpx.get(server.url + "/models/reverse").json()["parent"] == "moerge-tiny"
    assert httpx.get(server.url + "/models/router:centroid").json()["id"] == "router:centroid"
    assert httpx.get(server.url + "/models/nope").status_code == 404
    # OpenAI fields that change nothing generated are accepted; vLLM's ignore_eos and moerge's mixture too
    r = post(server, body(user="u1", metadata={"a": "b"}, store=False, service_tier="auto", best_of=1, suffix=None))
    assert r.status_code == 200, r.text
    r = post(server, {"model": "reverse", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                      "parallel_tool_calls": True, "tool_choice": "none", "response_format": {"type": "text"}},
             "/chat/completions")
    assert r.status_code == 200, r.text


def test_runtime_adapters_are_off_by_default_and_need_the_admin_key(experts, tmp_path):
    load = {"lora_name": "up2", "lora_path": str(experts["uppercase"])}
    with Server(experts=[str(experts["reverse"])], routers=[], api_key="user") as s:
        user = {"authorization": "Bearer user"}
        r = post(s, load, "/load_lora_adapter", headers=user)
        assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]
        r = post(s, {"lora_name": "reverse"}, "/unload_lora_adapter", headers=user)
        assert r.status_code == 403 and "reverse" in s.engine.bank.names
    with Server(experts=[str(experts["reverse"])], routers=[], api_key="user", admin_key="admin",
                adapter_roots=[experts["uppercase"].parent]) as s:
        r = post(s, load, "/load_lora_adapter", headers={"authorization": "Bearer user"})
        assert r.status_code == 401 and "--admin-key" in r.json()["error"]["message"]
        r = post(s, load, "/load_lora_adapter", headers={"authorization": "Bearer admin"})
        assert r.status_code == 200 and "up2" in r.json()["experts"]
        r = post(s, dict(load, lora_name="x", lora_path=str(tmp_path)), "/load_lora_adapter",
                 headers={"authorization": "Bearer admin"})
        assert r.status_code == 403 and "outside" in r.json()["error"]["message"]
        assert post(s, body("up2"), headers={"authorization": "Bearer user"}).status_code == 200
    from moerge.errors import MoergeError
    from moerge.serve import build

    with pytest.raises(MoergeError, match="--adapter-root"):
        build(admin_key="k")
    with pytest.raises(MoergeError, match="no such folder"):
        build(adapter_roots=[tmp_path / "missing"])


def without(b: dict, key: str) -> dict:
    return {k: v for k, v in b.items() if k != key}


def test_a_thousand_requests_with_random_bad_fields_mixed_with_good_ones(server):
    """Every bad request is a 4xx naming its problem, every good one is served, nothing stays in flight."""
    rng = random.Random(0)
    good = lambda: body(rng.choice(["reverse", "uppercase", "moerge-tiny", "router:centroid"]),  # noqa: E731
                        rng.choice(list(PROMPTS.values())), n=rng.randint(1, 3), seed=rng.randint(0, 2**40),
                        temperature=rng.choice([0, 0.7]))
    spoilers = [
        lambda b: b | {"seed": rng.choice([2**64 + 1, -(2**63) - 1, 10**30, "x", 1.5])},
        lambda b: b | {"max_tokens": rng.choice([0, -1, 10**6, 2**70, "many", 0.5])},
        lambda b: b | {"temperature": rng.choice([-0.1, 2.5, "hot", [1]])},
        lambda b: b | {"top_p": rng.choice([0, 1.5, -1])},
        lambda b: b | {"n": rng.choice([0, 17, 10**9])},
        lambda b: b | {"prompt": rng.choice([[], [10**6], [-5], [[]], [[1, -3]], [[1, "a"]], {"a": 1}, 3])},
        lambda b: b | {"model": rng.choice(["", "nope", "router:nope", 7, "x" * 600])},
        lambda b: b | {rng.choice(["max_token", "temprature", "seeed", "top-p", "stream_option"]): 1},
        lambda b: b | {"stop": rng.choice([[""], ["a"] * 5, 5, ["y" * 400]])},
        lambda b: b | {"mixture": rng.choice([{}, {"reverse": "lots"}, {"nobody": 1.0}, [1], {"reverse": 1e400}])},
        lambda b: b | {"logprobs": 2} if rng.random() < 0.5 else b | {"echo": True},
        lambda b: b | {"presence_penalty": rng.choice([0.5, 3.0])},
        lambda b: without(b, rng.choice(["model", "prompt"])),
        lambda b: b | {"stream_options": rng.choice([5, "x"]), "stream": rng.choice([True, "maybe"])},
    ]
    reqs = []
    for _ in range(1000):
        b = good()
        if rng.random() < 0.7:
            reqs.append((rng.choice(spoilers)(b), False))
        else:
            reqs.append((b, True))

    def send(b):
        raw = json.dumps(b, allow_nan=True)  # 1e400 is sent as Infinity, which Python's JSON parser reads
        return httpx.post(server.url + "/completions", content=raw, headers={"content-type": "application/json"},
                          timeout=WAIT)

    with httpx.Client():
        got = run_all([lambda b=b: send(b) for b, _ in reqs], workers=8)
    for (b, ok), r in zip(reqs, got):
        assert "Traceback" not in r.text
        if ok:
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), (b, r.text)
        else:
            assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (b, r.status_code, r.text)
    assert settled(server)["in_flight"] == 0
    serves(server)


@pytest.fixture(scope="module")
def slow_base(tmp_path_factory):
    """A random Llama slow enough on one thread (~20-30 ms a step) that a request outlives a signal."""
    from moerge.lm.tiny import make_base

    return make_base(tmp_path_factory.mktemp("slow") / "base", hidden=512, layers=8, intermediate=2048)


def test_sigterm_drains_what_is_in_flight_then_exits(slow_base):
    """`moerge serve` gets SIGTERM with two streams in flight: it refuses new connections, the short
    stream finishes with [DONE], the long one (past the grace period) gets a 503 error event, and the
    process exits on its own."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moerge.cli", "serve", "--base", str(slow_base), "--port", str(port),
                             "--grace-period", "4", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        s = type("S", (), {"url": url + "/v1"})()
        short, long_ = threading.Event(), threading.Event()
        got = {}
        jobs = [threading.Thread(target=lambda: got.__setitem__("short", stream_lines(s, body("base", n=15, ignore_eos=True), short))),
                threading.Thread(target=lambda: got.__setitem__("long", stream_lines(s, body("base", n=240, ignore_eos=True), long_)))]
        for j in jobs:
            j.start()
        assert short.wait(WAIT) and long_.wait(WAIT)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # nothing new is admitted
            httpx.post(url + "/v1/completions", json=body("base"), timeout=5)
        for j in jobs:
            j.join(WAIT)
        assert got["short"][-1] == "[DONE]"
        assert sum(len(e["choices"][0]["text"]) for e in got["short"] if isinstance(e, dict) and e.get("choices")) > 0
        assert got["long"][-1]["error"]["type"] == "server_error" and "shut down" in got["long"][-1]["error"]["message"]
        proc.wait(30)
        assert proc.returncode in (0, -signal.SIGTERM), proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_empty_completion_from_a_chat_model_says_why(server, monkeypatch):
    """A chat model that ends at once on a raw prompt (its experts learnt the chat format) answers 200
    with a warning pointing at the chat endpoint, streamed or not; a base without a chat template does not."""
    eos = next(iter(server.engine.eos))
    real_sample = server.engine._sample
    monkeypatch.setattr(server.engine, "_sample", lambda rows, logits: [eos] * len(rows))
    r = post(server, body())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "" and "warning" not in r.json()
    monkeypatch.setattr(server.engine.bank.tokenizer, "chat_template", "{{ messages }}", raising=False)
    r = post(server, body())
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["warning"]
    events = stream_lines(server, body())
    assert "/v1/chat/completions" in next(e for e in events if isinstance(e, dict) and e.get("warning"))["warning"]
    monkeypatch.setattr(server.engine, "_sample", real_sample)
    assert "warning" not in post(server, body()).json()
