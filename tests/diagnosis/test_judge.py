"""Judge protocol: prompt and strict parser, the OpenAI backend against a real HTTP server on
localhost (faults included), the local backend, the cache and resuming from it."""

import json
import logging
import socket
import time

import pytest

from helpers import FIXTURES, SYNONYMS, judge_server, rule_reply

from jaxzero.errors import DataError
from jaxzero.diagnosis.report import CaseResult, summarize_checkpoint, write_report
from jaxzero.diagnosis.judge import (JudgeCache, JudgeError, LocalJudge, OpenAIJudge, RuleJudge,
                                     cache_key, judged_rewards)
from jaxzero.diagnosis.protocols import JudgeItem, Verdict, jaxzero_protocol
from jaxzero.diagnosis.analysis import analyze_response
from jaxzero.diagnosis.reward import MAX_ANSWER_CHARS

JAX = jaxzero_protocol()
render_prompt = JAX.render
SECRET = "sk-test-5ecret-DO-NOT-LEAK"


@pytest.fixture
def server():
    with judge_server() as srv:
        yield srv


def make_judge(url, **kw):
    kw = {"concurrency": 4, "timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.01, **kw}
    return OpenAIJudge(url, "stub-judge", JAX, **kw)


def local_judge(generate, model_id, **kw):
    return LocalJudge(generate, model_id, JAX, max_new_tokens=64, **kw)


ITEMS = [
    JudgeItem.make(["Marfan syndrome"], ["Marfan syndrome"], ["Syndrome with aortic dilatation"]),
    JudgeItem.make(["MFS"], ["Marfan syndrome"]),
    JudgeItem.make(["syndrome with aortic dilatation"], ["Marfan syndrome"],
                   ["Syndrome with aortic dilatation"]),
    JudgeItem.make(["Ehlers-Danlos syndrome"], ["Marfan syndrome"],
                   ["Syndrome with aortic dilatation"]),
    JudgeItem.make(["Fabry disease", "LCHAD deficiency", "3C syndrome"],
                   ["LCHAD deficiency", "Long chain 3-hydroxyacyl-CoA dehydrogenase deficiency"],
                   ["3-hydroxyacyl-CoA dehydrogenase deficiency"]),
    JudgeItem.make(["Gaucher disease"], ["Gaucher disease type 1", "Gaucher disease"]),
]
EXPECTED = [(2,), (2,), (1,), (0,), (0, 2, 0), (2,)]


def test_item_make_cleans_and_dedupes():
    item = JudgeItem.make([" A ", "", None, "B\n(b)"], ["X", " x ", "Y"], ["y", "Z", "z", " "])
    assert item == JudgeItem("A\nB (b)", ("A", "B (b)"), ("X", "Y"), ("Z",))
    assert JudgeItem.make(["x" * 5000], ["X"]).answers == ("x" * MAX_ANSWER_CHARS,)
    with pytest.raises(DataError, match="no score-2 label"):
        JudgeItem.make(["A"], [" "])


def test_prompt_lists_both_sets_and_numbered_answers():
    prompt = render_prompt(ITEMS[4])
    assert "- Long chain 3-hydroxyacyl-CoA dehydrogenase deficiency" in prompt
    assert "- 3-hydroxyacyl-CoA dehydrogenase deficiency" in prompt
    assert "1. Fabry disease\n2. LCHAD deficiency\n3. 3C syndrome" in prompt
    assert "Broader set:\n(none)\n" in render_prompt(ITEMS[1])
    assert rule_reply(prompt) == ("1. Fabry disease: score 0;\n2. LCHAD deficiency: score 2;\n"
                                  "3. 3C syndrome: score 0;")


@pytest.mark.parametrize("reply, scores", [
    ("1. Fabry disease: score 0\n2. LCHAD: score 2;\n3. 3C syndrome: score 1.", (0, 2, 1)),
    ("Scores:\n\n1. A: B type: score 0\n2. x: **score 1**\n3) y: Score: 2", (0, 1, 2)),
    ("1. Fabry disease: score 0\n2. LCHAD: score 2", None),          # a line missing
    ("2. LCHAD: score 2\n1. Fabry: score 0\n3. 3C: score 0", None),  # out of order
    ("1. a: score 0\n2. b: score 3\n3. c: score 0", None),           # not 0/1/2
    ("1. a: score 0\n2. b - score 2\n3. c: score 0", None),          # unreadable score line
    ("1. a: score 0\n2. b: score 2\n3. c: score 0\n4. d: score 0", None),
    ("", None),
])
def test_parser_is_strict(reply, scores):
    verdict = JAX.parse(reply, ITEMS[4])
    assert verdict.scores == scores
    assert verdict.status == ("ok" if scores else "unparsed")
    assert bool(verdict.reason) == (scores is None)


def test_score1_without_hypernyms_is_unparsed():
    assert JAX.parse("1. MFS: score 1", ITEMS[1]).status == "unparsed"
    assert JAX.parse("1. MFS: score 2", ITEMS[1]).scores == (2,)


def test_verdict_top_k():
    assert Verdict((0, 1, 2, 0, 0)).top(1) == 0
    assert Verdict((0, 1, 2, 0, 0)).top(2) == 1
    assert Verdict((0, 1, 2, 0, 0)).top(5) == 2
    assert Verdict(()).top(5) == 0
    assert Verdict(None, reply="??", reason="bad").top(1) is None


def test_cache_key_covers_everything_that_decides_a_verdict():
    def key(item, model="m", settings=(0.0, 512)):
        return cache_key(render_prompt(item), model, settings)

    base = key(ITEMS[0])
    assert base == key(JudgeItem.make([" Marfan syndrome"], ["Marfan syndrome"],
                                      ["Syndrome with aortic dilatation"]))
    assert base != key(ITEMS[0], "other-model")
    assert base != key(ITEMS[0], settings=(0.1, 4096))
    for changed in (JudgeItem.make(["MFS"], ["Marfan syndrome"],
                                   ["Syndrome with aortic dilatation"]),
                    JudgeItem.make(["Marfan syndrome"], ["Marfan"],
                                   ["Syndrome with aortic dilatation"]),
                    JudgeItem.make(["Marfan syndrome"], ["Marfan syndrome"])):
        assert key(changed) != base


def test_openai_backend_against_local_server(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    verdicts = make_judge(server.base_url).judge_many(ITEMS)
    assert [v.scores for v in verdicts] == EXPECTED
    assert len(server.requests) == len(ITEMS)
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert first["body"]["temperature"] == 0 and first["body"]["model"] == "stub-judge"
    assert sorted(server.prompts()) == sorted(render_prompt(i) for i in ITEMS)


def test_no_key_in_environment_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    make_judge(server.base_url, api_key_env="JUDGE_KEY").judge_many(ITEMS[:1])
    assert "Authorization" not in server.requests[0]["headers"]


def test_empty_answers_and_duplicates_are_not_sent(server):
    empty = JudgeItem.make([""], ["Marfan syndrome"])
    verdicts = make_judge(server.base_url).judge_many([empty, ITEMS[1], ITEMS[1], empty])
    assert [v.scores for v in verdicts] == [(), (2,), (2,), ()]
    assert len(server.requests) == 1


def test_retries_429_honouring_retry_after_then_500_then_garbage_body(server):
    server.faults.extend([("429", "1"), 500, "garbage_body"])
    verdicts = make_judge(server.base_url, concurrency=1).judge_many(ITEMS[:2])
    assert [v.scores for v in verdicts] == EXPECTED[:2]
    assert len(server.requests) == 5
    t = [r["t"] for r in server.requests]
    assert t[1] - t[0] >= 0.95           # Retry-After: 1 was honoured
    assert t[2] - t[1] < 0.9             # the 500 used our short backoff


def test_timeout_is_retried(server):
    server.faults.append(("sleep", 1.0))
    verdicts = make_judge(server.base_url, concurrency=1, timeout_s=0.3).judge_many(ITEMS[:1])
    assert verdicts[0].scores == (2,)
    assert len(server.requests) == 2


def test_garbage_reply_is_an_unparsed_verdict_not_a_retry(server):
    server.faults.append("garbage_content")
    verdicts = make_judge(server.base_url, concurrency=1).judge_many(ITEMS[:3])
    assert [v.status for v in verdicts] == ["unparsed", "ok", "ok"]
    assert verdicts[0].top(1) is None and "mostly right" in verdicts[0].reply
    assert len(server.requests) == 3


def test_persistent_5xx_gives_up_after_bounded_attempts(server):
    server.faults.extend([503] * 50)
    with pytest.raises(JudgeError, match=r"gave up after 4 attempts \(timeout 5 s each, 3 retries.*last error: HTTP 503"):
        make_judge(server.base_url, concurrency=1, max_retries=3).judge_many(ITEMS[:1])
    assert len(server.requests) == 4


def test_other_4xx_fails_fast(server):
    server.faults.append(404)
    with pytest.raises(JudgeError, match="HTTP 404"):
        make_judge(server.base_url, concurrency=1).judge_many(ITEMS[:1])
    assert len(server.requests) == 1


def test_connection_refused_is_bounded():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(JudgeError, match="gave up after 3 attempts.*cannot reach"):
        make_judge(f"http://127.0.0.1:{port}/v1", max_retries=2).judge_many(ITEMS)
    assert time.monotonic() - start < 5


def test_interrupted_run_resumes_from_cache(server, tmp_path):
    items = [JudgeItem.make([f"Disease {i}"], [f"Disease {i % 3}"]) for i in range(12)]
    path = tmp_path / "judge_cache.jsonl"
    server.fail_after = 5
    with pytest.raises(JudgeError, match="HTTP 400"):
        make_judge(server.base_url, cache=JudgeCache(path)).judge_many(items)
    done = len(JudgeCache(path))
    assert 1 <= done <= 5
    sent_before = set(server.prompts()[:5])

    server.fail_after, server.requests = None, []
    verdicts = make_judge(server.base_url, cache=JudgeCache(path)).judge_many(items)
    assert [v.scores for v in verdicts] == [(2,) if i < 3 else (0,) for i in range(12)]
    assert len(server.requests) == len(items) - done
    cached = {render_prompt(i) for i in items} - set(server.prompts())
    assert len(cached) == done and cached <= sent_before

    server.requests = []
    again = make_judge(server.base_url, cache=JudgeCache(path)).judge_many(items)
    assert again == verdicts and server.requests == []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(items)
    assert {r["protocol"] for r in records} == {JAX.version}


def test_cache_survives_a_torn_last_line_and_rejects_corruption(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = JudgeCache(path)
    cache.put(cache_key(render_prompt(ITEMS[1]), "m", ()), "m", JAX.version, ITEMS[1],
              "1. MFS: score 2")
    with open(path, "a") as f:
        f.write('{"key": "abc", "rep')
    reopened = JudgeCache(path)
    assert len(reopened) == 1 and path.read_text().endswith("}\n")
    with open(path, "a") as f:
        f.write("not json\n")
    with pytest.raises(DataError, match=r"c.jsonl: line 2"):
        JudgeCache(path)


def test_api_key_never_reaches_logs_cache_errors_or_repr(server, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    path = tmp_path / "cache.jsonl"
    server.faults.extend([500, ("429", "0")])
    judge = make_judge(server.base_url, concurrency=1, cache=JudgeCache(path))
    verdicts = judge.judge_many(ITEMS[:3])
    cases = [CaseResult(str(i), item.score2_labels, "", item.answers, 0.0, v,
                        analyze_response(""), 0)
             for i, (item, v) in enumerate(zip(ITEMS, verdicts))]
    report_md, report_json = write_report(
        tmp_path / "report", [summarize_checkpoint("c", cases, judge=judge.model_id)])
    server.fail_after = 0
    with pytest.raises(JudgeError) as err:
        judge.judge_many(ITEMS[3:])
    assert server.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert "<redacted>" in str(err.value)
    for text in (caplog.text, path.read_text(), str(err.value), repr(judge),
                 report_md.read_text(), report_json.read_text()):
        assert SECRET not in text
    assert "retry 1/3" in caplog.text


class FlakyGenerate:
    """A fake `generate_fn`: `reply` per prompt, recording batches, raising after `fail_after`
    batches."""

    def __init__(self, fail_after=None, reply=rule_reply):
        self.batches, self.fail_after, self.reply = [], fail_after, reply

    def __call__(self, prompts):
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise RuntimeError("device lost")
        self.batches.append(list(prompts))
        return [self.reply(p) for p in prompts]


def test_local_judge_batches_and_resumes(tmp_path):
    path = tmp_path / "local.jsonl"
    generate = FlakyGenerate(fail_after=1)
    with pytest.raises(RuntimeError, match="device lost"):
        local_judge(generate, "tiny-qwen", batch_size=4, cache=JudgeCache(path)).judge_many(ITEMS)
    assert [len(b) for b in generate.batches] == [4]
    assert len(JudgeCache(path)) == 4

    generate = FlakyGenerate()
    verdicts = local_judge(generate, "tiny-qwen", batch_size=4,
                          cache=JudgeCache(path)).judge_many(ITEMS + ITEMS[:2])
    assert [v.scores for v in verdicts] == EXPECTED + EXPECTED[:2]
    assert [len(b) for b in generate.batches] == [2]
    assert generate.batches[0] == [render_prompt(i) for i in ITEMS[4:]]


def test_local_judge_checks_reply_count():
    with pytest.raises(JudgeError, match="1 replies for 2 prompts"):
        local_judge(lambda prompts: ["x"], "m").judge_many(ITEMS[:2])


def test_cache_is_per_judge_model(tmp_path):
    cache = JudgeCache(tmp_path / "c.jsonl")
    local_judge(FlakyGenerate(), "judge-a", cache=cache).judge_many(ITEMS)
    other = FlakyGenerate()
    local_judge(other, "judge-b", cache=cache).judge_many(ITEMS)
    assert sum(len(b) for b in other.batches) == len(ITEMS)


def test_rule_judge_uses_the_reward_matching_rule():
    verdicts = RuleJudge().judge_many(ITEMS)
    # "MFS" is a synonym only a judge model knows; case and a missing letter are the rule's.
    assert [v.scores for v in verdicts] == [(2,), (0,), (1,), (0,), (0, 2, 0), (2,)]
    item = JudgeItem.make(["Marfan syndrom", "Syndrome with aortic dilation"], ["Marfan syndrome"],
                          ["Syndrome with aortic dilatation"])
    assert RuleJudge().judge_many([item])[0].scores == (2, 1)
    assert RuleJudge(threshold=0.99).judge_many([item])[0].scores == (0, 0)
    assert RuleJudge().model_id == "matching-rule(rapidfuzz>0.8)"


def test_judged_rewards_asks_only_what_the_rule_misses(tmp_path):
    responses = ["<answer>Marfan syndrome</answer>", "<answer>MFS</answer>",
                 "<answer>Syndrome with aortic dilatation</answer>", "<answer>Fabry</answer>",
                 "no answer", "<answer>??</answer>"]
    labels = [["Marfan syndrome"]] * 6
    hypernyms = [["Syndrome with aortic dilatation"]] * 6
    generate = FlakyGenerate(reply=lambda p: "eh?" if "??" in p else rule_reply(p))
    judge = local_judge(generate, "j", cache=JudgeCache(tmp_path / "c"))
    rewards, unparsed = judged_rewards(responses, labels, judge, score1_labels=hypernyms,
                                       hypernym_score=0.5)
    assert rewards == [1.0, 1.0, 0.5, 0.1, 0.0, 0.1] and unparsed == 1
    assert sum(len(b) for b in generate.batches) == 4
    # The unparsed reply is not final: asked again by default, kept with retry_unparsed off.
    assert judged_rewards(responses, labels, judge, score1_labels=hypernyms,
                          hypernym_score=0.5) == (rewards, 1)
    assert sum(len(b) for b in generate.batches) == 5
    judge.retry_unparsed = False
    assert judged_rewards(responses, labels, judge, score1_labels=hypernyms,
                          hypernym_score=0.5) == (rewards, 1)
    assert sum(len(b) for b in generate.batches) == 5


def test_rarearena_protocol_call_and_reply(server):
    from jaxzero.diagnosis.hypernyms import load_hypernyms
    from jaxzero.diagnosis.protocols import load_protocol
    protocol = load_protocol("rarearena", FIXTURES / "rarearena")
    table = load_hypernyms(FIXTURES / "rarearena" / "benchmark_data" / "orphanet_hypernym.json")
    record = {"id": "a", "labels": ["Marfan syndrome"], "orpha_id": "558",
              "diagnosis": "Marfan syndrome"}
    item = protocol.item(record, "1. MFS\n2. Syndrome with aortic dilatation",
                         ("MFS", "Syndrome with aortic dilatation"), table)
    judge = OpenAIJudge(server.base_url, "gpt-4o", protocol, timeout_s=5.0)
    [verdict] = judge.judge_many([item])
    body = server.requests[0]["body"]
    assert (body["temperature"], body["max_tokens"], body["model"]) == (0.1, 4096, "gpt-4o")
    assert body["messages"] == [{"role": "user", "content": protocol.render(item)}]
    assert "1. MFS\n2. Syndrome with aortic dilatation" in body["messages"][0]["content"]
    assert verdict.scores == verdict.loose == (2, 1)


def test_unparsed_cached_replies_are_asked_again_unless_kept(server, tmp_path):
    path = tmp_path / "judge_cache.jsonl"
    server.faults.append("garbage_content")
    # One request at a time, so the garbage reply is the first item's, not whichever came first.
    first = make_judge(server.base_url, cache=JudgeCache(path),
                       concurrency=1).judge_many(ITEMS[:2])
    assert [v.status for v in first] == ["unparsed", "ok"] and len(server.requests) == 2
    server.requests = []
    kept = make_judge(server.base_url, cache=JudgeCache(path),
                      retry_unparsed=False).judge_many(ITEMS[:2])
    assert kept == first and server.requests == []
    again = make_judge(server.base_url, cache=JudgeCache(path)).judge_many(ITEMS[:2])
    assert [v.scores for v in again] == EXPECTED[:2] and len(server.requests) == 1
    server.requests = []
    assert make_judge(server.base_url, cache=JudgeCache(path)).judge_many(ITEMS[:2]) == again
    assert server.requests == []   # the fixed reply, appended last, is the one that counts


def test_hung_server_fails_within_the_timeout_and_retry_budget(server):
    server.hang_s = 30.0
    judge = make_judge(server.base_url, concurrency=8, timeout_s=0.4, max_retries=1,
                       backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(JudgeError) as err:
        judge.judge_many([JudgeItem.make([f"D{i}"], ["X"]) for i in range(8)])
    elapsed = time.monotonic() - start
    # 2 attempts x 0.4 s + a 0.1 s backoff, plus one more timeout for requests in flight.
    assert elapsed < 3.0
    message = str(err.value)
    assert "\n" not in message
    assert "gave up after 2 attempts (timeout 0.4 s each, 1 retries" in message


def test_judge_progress_bar_on_a_terminal(server, monkeypatch, capsys):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    make_judge(server.base_url).judge_many(ITEMS[:3])
    assert "judging:" in term.getvalue() and "/3 [" in term.getvalue()
