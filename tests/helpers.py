"""Shared test fixtures: tiny random models (jaxzero and transformers), GRPO batches, paths.

Test files import from here and never from one another.
"""

import ast
import contextlib
import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from safetensors import safe_open

from jaxzero.model.config import Qwen2Config
from jaxzero.rl import grpo
from jaxzero.rl.train_step import TrainBatch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

# ---------------------------------------------------------------- transformers models

FAKE_TOKENIZER = {"tokenizer.json": '{"fake": "tokenizer"}',
                  "tokenizer_config.json": '{"model_max_length": 64}'}


def make_hf_model(*, tie=False, heads=4, kv_heads=2, hidden=32, head_dim=None, layers=2,
                  vocab=96, intermediate=48, seed=0):
    """A tiny random transformers Qwen2ForCausalLM; norms and biases random too (HF makes
    them 1 and 0, which would hide a mix-up between them)."""
    torch.manual_seed(seed)
    extra = {"head_dim": head_dim} if head_dim else {}
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        tie_word_embeddings=tie, bos_token_id=vocab - 2, eos_token_id=vocab - 1, **extra)
    cfg._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_hf(model, path, *, dtype=torch.float32, max_shard_size="50GB", tokenizer=True):
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    if tokenizer:
        for name, text in FAKE_TOKENIZER.items():
            (path / name).write_text(text)
    return path


def hf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of an HF dir (single file or shards), by name."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                assert name not in out
                out[name] = f.get_tensor(name)
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        # Bytes, not values: bit-exact, NaN- and -0.0-proof.
        assert a[name].tobytes() == b[name].tobytes(), name


# ---------------------------------------------------------------- a tiny jaxzero model, a GRPO batch

TINY = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
R = 6  # response slots of the GRPO batch fixture
LOSS = grpo.LossConfig(entropy_coeff=0.01, use_kl_loss=True, kl_coef=0.1)


def grpo_batch(seed=0, b=8, p=10):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, TINY.vocab_size, (b, p + R)).astype(np.int32)
    valid = np.ones((b, p + R), bool)
    for i in range(b):
        valid[i, : rng.randint(0, 5)] = False          # left padding
        valid[i, p + rng.randint(1, R + 1):] = False    # early stop
    mask = valid[:, p:].astype(np.float32)
    return TrainBatch(jnp.array(tokens), jnp.array(valid), jnp.array(mask),
                      jnp.array(rng.randn(b).astype(np.float32)),
                      jnp.array(-rng.rand(b, R).astype(np.float32) - 4.5),
                      jnp.array(-rng.rand(b, R).astype(np.float32) - 4.5))


# ---------------------------------------------------------------- a fake judge server

SYNONYMS = {"mfs": "marfan syndrome", "lchad deficiency":
            "long chain 3-hydroxyacyl-coa dehydrogenase deficiency"}


def _section(prompt: str, title: str) -> list[str]:
    lines = prompt.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.split(" ", 1)[1] for line in lines if line != "(none)"]


def _fixture_sets(prompt: str) -> tuple[list[str], list[str], list[str]]:
    """(answers, score-2 set, score-1 set) of a prompt rendered from tests/fixtures/rarearena:
    the sets are Python lists (eval_updated.py) or one reference (eval.py)."""
    def after(tag):
        line = next((x for x in prompt.splitlines() if x.startswith(tag)), None)
        return None if line is None else line[len(tag):].strip()

    answer = prompt.split("\nAnswer:\n", 1)[1].split("\n\nReply per disease", 1)[0]
    answers = [re.sub(r"^\d+\s*[.)]\s*", "", a.strip()).rstrip(";.") for a in answer.splitlines()
               if a.strip()]
    if after("Reference:") is not None:
        return answers, [after("Reference:")], []
    parents = after("Parent list:")
    return (answers, ast.literal_eval(after("Synonym list:")),
            ast.literal_eval(parents) if parents else [])


def rule_reply(prompt: str) -> str:
    """The stand-in judge model: exact match up to case, plus a small synonym table; it reads
    jaxzero's prompt and the RareArena-layout fixture prompts."""
    if "[fixture prompt" in prompt:
        answers, exact, broader = _fixture_sets(prompt)
    else:
        answers = _section(prompt, "Student diagnoses:")
        exact, broader = _section(prompt, "Exact set:"), _section(prompt, "Broader set:")
    exact, broader = {s.casefold() for s in exact}, {s.casefold() for s in broader}
    out = []
    for i, answer in enumerate(answers, 1):
        name = SYNONYMS.get(answer.casefold(), answer.casefold())
        out.append(f"{i}. {answer}: score {2 if name in exact else 1 if name in broader else 0};")
    return "\n".join(out)


class FakeOpenAI(ThreadingHTTPServer):
    """An OpenAI-wire-format chat-completions server. `faults` is a queue of actions taken, one
    per request, before it answers normally: an int HTTP status, ("429", retry_after),
    ("sleep", s), "garbage_body" or "garbage_content". `fail_after` answers HTTP 400 to every
    request after that many."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.faults: deque = deque()
        self.requests: list[dict] = []
        self.fail_after: int | None = None
        self.hang_s: float = 0.0   # every request waits this long first (a hung server)
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def prompts(self) -> list[str]:
        return [r["body"]["messages"][0]["content"] for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        server: FakeOpenAI = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append({"path": self.path, "headers": dict(self.headers),
                                    "body": body, "t": time.monotonic()})
            count = len(server.requests)
            fault = server.faults.popleft() if server.faults else None
        if server.hang_s:
            time.sleep(server.hang_s)
        if server.fail_after is not None and count > server.fail_after:
            # Echo the credentials, as a careless proxy might: they must not reach any output.
            return self._send(400, f"bad request ({self.headers['Authorization']})".encode())
        if isinstance(fault, int):
            return self._send(fault, b'{"error": "injected"}')
        if isinstance(fault, tuple) and fault[0] == "429":
            return self._send(429, b"slow down", {"Retry-After": fault[1]})
        if isinstance(fault, tuple) and fault[0] == "sleep":
            time.sleep(fault[1])
        if fault == "garbage_body":
            return self._send(200, b"<html>not json</html>")
        content = ("I think the student is mostly right." if fault == "garbage_content"
                   else rule_reply(body["messages"][0]["content"]))
        reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}]}
        try:
            self._send(200, json.dumps(reply).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and went away


@contextlib.contextmanager
def judge_server():
    """A running FakeOpenAI on localhost, shut down on exit."""
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- the toy task (the seam's second task)

TOY_TARGET = (5, 6, 7)


def toy_task(records, *, evaluate=None):
    """A Task whose right answer, after any prompt, is the tokens 5, 6, 7: the reward is the
    fraction of those three positions right. Texts are the token ids written out."""
    from jaxzero.rl.task import Evaluation, Task

    def reward(texts, targets):
        def score(text, target):
            ids = [int(t) for t in text.split()]
            return sum(a == b for a, b in zip(ids, target)) / len(target)
        return np.array([score(t, tg) for t, tg in zip(texts, targets)], np.float32)

    def analyze(texts):
        return {"toy/starts_with_5": float(np.mean([t.split()[:1] == ["5"] for t in texts]))}

    return Task(name="toy", train_records=records, test_records=records[:4],
                decode=lambda ids: [" ".join(map(str, row)) for row in ids],
                reward=reward, target=lambda r: TOY_TARGET,
                prompt_text=lambda r: " ".join(map(str, r["prompt_token_ids"])),
                analyze=analyze,
                evaluate=evaluate or (lambda generate, params, recs: Evaluation({}, 0, ())),
                correct_score=1.0)


def toy_records(count, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": f"toy{i}", "prompt_token_ids": [int(t) for t in
                                                  rng.integers(8, 30, rng.integers(3, 8))]}
            for i in range(count)]


# ---------------------------------------------------------------- a stand-in bucket

def fake_bucket(root: Path, monkeypatch) -> Path:
    """gs:// URLs served from the local directory `root` (gs://B/P is root/B/P): an fsspec
    filesystem for etils epath (jaxzero's and orbax's small files), and orbax's array writes
    (tensorstore's own gcs driver would go to the network) redirected to the same place.
    What it stands in for is the object store's API, not its semantics: no network, no
    eventual consistency. Returns root."""
    import importlib
    fsspec_registry = importlib.import_module("fsspec.registry")  # the module, not fsspec.registry
    from fsspec.implementations.local import LocalFileSystem
    from jaxzero.io import checkpoint

    class Bucket(LocalFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""

        def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's option
            super().__init__(*args, auto_mkdir=True, **kwargs)  # objects need no folders

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    return f"{root}/{path[len(prefix):].lstrip('/')}".rstrip("/")
            return super()._strip_protocol(path)

    root.mkdir(parents=True, exist_ok=True)
    for scheme in Bucket.protocol:
        monkeypatch.setitem(fsspec_registry._registry, scheme, Bucket)
    local = checkpoint.storage_path
    monkeypatch.setattr(checkpoint, "storage_path", lambda p: root / str(p)[len("gs://"):]
                        if str(p).startswith("gs://") else local(p))
    return root
