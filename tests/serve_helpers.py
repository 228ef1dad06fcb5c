"""A real uvicorn server in a thread on a free 127.0.0.1 port, and a tiny causal LM folder with a
tokenizer made in-process (no network)."""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
WORDS = ("the a cat dog sat on mat and ran to house big small red blue green is was very not "
         "good bad day night sun moon tree road car user assistant system :").split()


@contextmanager
def running(app, **config):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)


def tiny_causal_dir(path: Path, family: str = "gpt2") -> Path:
    """A tiny random-weight causal LM (vocab 99) with a WordLevel tokenizer and a chat template."""
    from conftest import tiny_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<pad>"] + list(WORDS)
    vocab += [f"w{i}" for i in range(98 - len(vocab))] + ["<eos>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    model = tiny_model(family, "causal-lm", eos_token_id=98, bos_token_id=98, pad_token_id=1)
    model.generation_config.eos_token_id = 98
    model.generation_config.pad_token_id = 1
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"([^{ ]+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0
