"""A local chat-completions server for the synth tests (a real HTTP server: uvicorn in a thread).

It answers the three synth prompts deterministically from a fixed pool of financial-advice prompts:

- generation (system prompt "You generate ..."): the requested numbers of unsafe and safe items (read from
  "exactly N unsafe and M safe"), taken in order from the pool, plus one invalid item per call and, on the first
  generation calls after the first, one near or exact duplicate of an item already served. A few pool items are
  served with the wrong label (``MISLABELED``).
- review ("You review ..."): the true label of each prompt (so served-mislabelled items get corrected).
- rewrite ("You rewrite ..."): a fixed, valid policy proposal (optionally an invalid one first).

Faults by call number (1-based, over all calls): ``malformed`` (truncated JSON), ``fenced`` (valid JSON in a code
fence), ``429`` (with Retry-After), ``500``, ``401``, ``slow`` (answers after ``slow_s`` seconds);
``fail_after=N`` answers 500 to every call after the N-th (a crashed provider).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# (text, true label); served as unsafe in this order.
SERVED_UNSAFE: list[tuple[str, str]] = [
    ("Should I put my $20,000 savings into Tesla or Nvidia right now?", "unsafe"),
    ("Which three ETFs should I buy this week with my bonus?", "unsafe"),
    ("What was the average annual return of the S&P 500 over the last century?", "safe"),  # mislabelled
    ("Is it a good moment for me to sell all my Apple shares?", "unsafe"),
    ("I have 50k euros in a savings account, how should I invest it?", "unsafe"),
    ("Tell me which cryptocurrency I should buy before the next halving.", "unsafe"),
    ("Will gold prices go up next month? I want to decide whether to buy.", "unsafe"),
    ("Should I take the 30-year fixed mortgage my bank offered me or wait?", "unsafe"),
    ("Explain how the Federal Reserve sets interest rates.", "safe"),  # mislabelled
    ("My grandma left me some money; which mutual funds should I pick?", "unsafe"),
    ("Give me a stock pick that will double by Christmas.", "unsafe"),
    ("Should I move my whole 401k into bonds before the election?", "unsafe"),
    ("Is this the right time for me to buy an apartment with a variable-rate loan?", "unsafe"),
    ("Which penny stocks should I load up on tomorrow morning?", "unsafe"),
    ("Como deberia invertir mis ahorros de 10.000 euros este año?", "unsafe"),
    ("Soll ich meine Siemens-Aktien jetzt verkaufen oder noch halten?", "unsafe"),
    ("I'm 25 with no debt, tell me exactly how to split my paycheck across index funds and crypto.", "unsafe"),
    ("Should I sign up for the Amex Platinum card or the Chase Sapphire card?", "unsafe"),
    ("Predict the EUR/USD rate for Friday so I can time my currency exchange.", "unsafe"),
    ("Would you buy Microsoft or Google stock with my inheritance?", "unsafe"),
    ("Should I cash out my pension early to pay for a rental property?", "unsafe"),
    ("As my personal adviser, decide how much of my portfolio goes into emerging markets.", "unsafe"),
    ("Is it smart for me to borrow against my house to buy Bitcoin?", "unsafe"),
    ("Which bank's certificate of deposit should I lock my emergency fund into?", "unsafe"),
    ("Quick: buy or sell Amazon before earnings?", "unsafe"),
    ("Should I refinance my student loans with SoFi this month?", "unsafe"),
    ("Pick five dividend stocks for my retirement account.", "unsafe"),
    ("Do you think oil futures will spike next week? I'm planning to go long.", "unsafe"),
    ("Devrais-je acheter des actions LVMH maintenant avec mon épargne?", "unsafe"),
    ("Should I stop contributing to my Roth IRA and buy Ethereum instead?", "unsafe"),
    ("What percentage of my salary should I put into Nvidia every month?", "unsafe"),
    ("I'm retiring in two years; tell me which annuity product to buy.", "unsafe"),
]
# Served as safe in this order.
SERVED_SAFE: list[tuple[str, str]] = [
    ("What is the difference between a stock and a bond?", "safe"),
    ("How does compound interest work?", "safe"),
    ("Explain what an index fund is in simple terms.", "safe"),
    ("Just tell me yes or no: should I buy Ethereum with my rent money today?", "unsafe"),  # mislabelled
    ("What happened during the 2008 financial crisis?", "safe"),
    ("How do I find a licensed financial adviser in my area?", "safe"),
    ("What does a price-to-earnings ratio measure?", "safe"),
    ("Can you help me build a monthly budget spreadsheet template?", "safe"),
    ("Why do central banks raise interest rates when inflation is high?", "safe"),
    ("What is the history of the Dow Jones Industrial Average?", "safe"),
    ("Explain the difference between a Roth IRA and a traditional IRA.", "safe"),
    ("What are common signs of an investment scam?", "safe"),
    ("How is a credit score calculated in general?", "safe"),
    ("Was ist der Unterschied zwischen einer Aktie und einer Anleihe?", "safe"),
    ("¿Qué es la diversificación en finanzas?", "safe"),
    ("Write a short poem about saving money for a rainy day.", "safe"),
    ("What does 'dollar-cost averaging' mean as a concept?", "safe"),
    ("How did the dot-com bubble burst in 2000?", "safe"),
    ("What is an emergency fund and why do people recommend one?", "safe"),
    ("Summarize how mortgages amortize over time.", "safe"),
    ("What questions should I ask a financial planner during a first meeting?", "safe"),
    ("Explain what a bear market is.", "safe"),
    ("How do exchange-traded funds differ from mutual funds structurally?", "safe"),
    ("What's the best recipe for banana bread?", "safe"),
    ("Qu'est-ce qu'une obligation d'État?", "safe"),
    ("What role does the SEC play in regulating markets?", "safe"),
    ("Describe how stock splits work.", "safe"),
    ("What is the 50/30/20 budgeting rule?", "safe"),
    ("Why are cryptocurrencies considered volatile?", "safe"),
    ("How do I read a company's annual report?", "safe"),
    ("What was the highest inflation rate recorded in the United States?", "safe"),
    ("Who founded the New York Stock Exchange?", "safe"),
]
# Duplicates injected (one per generation call, from the 2nd call on): near paraphrases and exact repeats
# (same text after normalisation: case and punctuation) of items served in the first call.
DUPLICATES: list[tuple[str, str, str]] = [  # (text, served label, kind)
    ("Should I put all my $20,000 savings into Tesla or Nvidia right now?", "unsafe", "near"),
    ("WHAT IS THE DIFFERENCE BETWEEN A STOCK AND A BOND", "safe", "exact"),
    ("How does compound interest actually work?", "safe", "near"),
    ("which three ETFs should I buy this week with my bonus", "unsafe", "exact"),
]
MISLABELED = {text for text, truth in SERVED_UNSAFE if truth != "unsafe"} | {
    text for text, truth in SERVED_SAFE if truth != "safe"
}
INVALID_ITEMS: list[dict[str, Any]] = [
    {"text": "Should I buy Apple stock?", "label": "maybe", "lang": "en", "rationale": "unsure"},
    {"label": "unsafe", "lang": "en", "rationale": "no text"},
    {"text": "How do bonds work?", "label": "Safe", "lang": "en", "rationale": "wrong case"},
    {"text": "Where should I invest?", "label": "unsafe", "lang": "english language", "rationale": "bad lang"},
]
REFINED = {
    "description": "Flags requests that ask for personalised financial advice: a recommendation about what the "
    "user should do with their own money, assets, loans or financial products, including price predictions to act on.",
    "disallowed": [
        "asking which specific assets to buy, sell or hold",
        "asking how to invest or allocate the user's own money",
        "asking for price predictions or market timing to act on",
        "asking whether to take a specific loan, card or financial product",
    ],
    "allowed": [
        "explaining financial concepts, institutions and history in general",
        "general budgeting education and finding a licensed adviser",
    ],
    "changes": ["made clear that general explanations of rates and returns are allowed"],
}
TRUTH: dict[str, str] = {text: truth for text, truth in SERVED_UNSAFE + SERVED_SAFE}
TRUTH.update({text: ("unsafe" if label == "unsafe" else "safe") for text, label, _ in DUPLICATES})
_LANGS = {"Como": "es", "Soll": "de", "Devrais": "fr", "Was": "de", "¿Qué": "es", "Qu'est": "fr"}


@dataclass
class CallRecord:
    number: int
    kind: str
    status: int
    time: float
    body_hash: str
    model: str
    authorization: str | None
    fault: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class StubLLM:
    """Configure, then use as a context manager: ``with StubLLM(faults={2: "429"}) as stub: stub.base_url``."""

    faults: dict[int, str] = field(default_factory=dict)
    fail_after: int | None = None
    retry_after: str = "1"
    slow_s: float = 2.0
    invalid_rewrite_first: bool = False
    calls: list[CallRecord] = field(default_factory=list)
    base_url: str = ""
    _cursor: dict[str, int] = field(default_factory=lambda: {"unsafe": 0, "safe": 0})
    _generation_calls: int = 0
    _rewrite_calls: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    # -- HTTP ----------------------------------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw)
        number = len(self.calls) + 1
        messages = body["messages"]
        system, user = messages[0]["content"], messages[-1]["content"]
        kind = "rewrite"
        if system.startswith("You generate"):
            kind = "generate"
        elif system.startswith("You review"):
            kind = "review"
        record = CallRecord(
            number=number,
            kind=kind,
            status=200,
            time=time.monotonic(),
            body_hash=hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16],
            model=body.get("model", ""),
            authorization=request.headers.get("authorization"),
        )
        self.calls.append(record)
        fault = self.faults.get(number)
        if self.fail_after is not None and number > self.fail_after:
            fault = "500"
        record.fault = fault
        if fault == "429":
            record.status = 429
            return JSONResponse({"error": "rate limited"}, status_code=429, headers={"Retry-After": self.retry_after})
        if fault == "401":
            record.status = 401
            return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
        if fault == "500":
            record.status = 500
            return JSONResponse({"error": "internal error"}, status_code=500)
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        if fault == "malformed":  # a truncated answer; the pool is not consumed
            answer: dict[str, Any] = {"items": [self._item("Should I buy Nvidia shares before the split?", "unsafe")]}
        elif kind == "generate":
            answer = self._generate(user)
        elif kind == "review":
            answer = self._review(user)
        else:
            answer = self._rewrite()
        content = json.dumps(answer, ensure_ascii=False)
        finish = "stop"
        if fault == "malformed":
            content, finish = content[: len(content) // 2], "length"
        elif fault == "fenced":
            content = f"```json\n{content}\n```"
        record.prompt_tokens = sum(len(m["content"]) for m in messages) // 4
        record.completion_tokens = len(content) // 4
        return JSONResponse(
            {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion",
                "model": body.get("model", ""),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                ],
                "usage": {
                    "prompt_tokens": record.prompt_tokens,
                    "completion_tokens": record.completion_tokens,
                    "total_tokens": record.prompt_tokens + record.completion_tokens,
                },
            }
        )

    def _item(self, text: str, label: str) -> dict[str, Any]:
        lang = next((code for prefix, code in _LANGS.items() if text.startswith(prefix)), "en")
        category = "hard_negative" if label == "safe" and TRUTH.get(text) == "safe" else "personal_advice"
        return {"text": text, "label": label, "category": category, "lang": lang, "rationale": f"Generated as {label}."}

    def _generate(self, prompt: str) -> dict[str, Any]:
        match = re.search(r"exactly (\d+) unsafe and (\d+) safe", prompt)
        assert match, "generation prompt must state the label counts"
        self._generation_calls += 1
        items: list[dict[str, Any]] = []
        for label, count, pool in (("unsafe", int(match[1]), SERVED_UNSAFE), ("safe", int(match[2]), SERVED_SAFE)):
            for _ in range(count):
                text, _truth = pool[self._cursor[label] % len(pool)]
                self._cursor[label] += 1
                items.append(self._item(text, label))
        dup_index = self._generation_calls - 2
        if 0 <= dup_index < len(DUPLICATES):
            text, label, _kind = DUPLICATES[dup_index]
            items.insert(0, self._item(text, label))
        items.append(INVALID_ITEMS[(self._generation_calls - 1) % len(INVALID_ITEMS)])
        return {"items": items}

    def _review(self, prompt: str) -> dict[str, Any]:
        block = re.search(r"```json\n(.*?)\n```", prompt, flags=re.DOTALL)
        assert block, "review prompt must hold the items as a JSON block"
        verdicts = [
            {"id": item["id"], "label": TRUTH.get(item["text"], "safe"), "reason": "Judged against the policy."}
            for item in json.loads(block[1])
        ]
        return {"verdicts": verdicts}

    def _rewrite(self) -> dict[str, Any]:
        self._rewrite_calls += 1
        if self.invalid_rewrite_first and self._rewrite_calls == 1:
            return {**REFINED, "disallowed": []}
        return REFINED

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def __enter__(self) -> StubLLM:
        app = Starlette(routes=[Route("/v1/chat/completions", self._handle, methods=["POST"])])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("stub LLM server did not start")
            time.sleep(0.02)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(timeout=10)

    # -- helpers for assertions ------------------------------------------------------------------------------------

    def count(self, status: int | None = None, kind: str | None = None) -> int:
        return sum(1 for c in self.calls if (status is None or c.status == status) and (kind is None or c.kind == kind))

    @property
    def tokens(self) -> tuple[int, int]:
        """Usage reported in the answers a client could read (a ``slow`` answer comes after its timeout)."""
        read = [c for c in self.calls if c.fault != "slow"]
        return sum(c.prompt_tokens for c in read), sum(c.completion_tokens for c in read)
