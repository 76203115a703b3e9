"""The naive peer for ``uniguard bench --peer``: FastAPI + a transformers sequence classifier on a torch checkpoint,
one (policy, prompt) pair per forward, full attention, no batching, no cache. What a first guard service looks like;
the benchmark measures UniGuard against it on the same machine. Needs the training extras (torch, transformers).

    python -m uniguard.peer --checkpoint runs/multitask --port 8100
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class PeerRequest(BaseModel):
    input: str
    policies: list[str] | None = None


def create_app(checkpoint: Path, threads: int | None = None) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from policies.registry import PolicyRegistry

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    registry = PolicyRegistry.load()
    texts = {p.name: p.instruction_text() for p in registry}
    defaults = [p.name for p in registry.defaults()]
    app = FastAPI(title="naive peer")

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/classify")
    def classify(request: PeerRequest) -> dict[str, Any]:
        verdicts = {}
        for name in request.policies or defaults:
            inputs = tokenizer(texts[name], request.input, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                score = float(torch.softmax(model(**inputs).logits, dim=-1)[0, 1])
            verdicts[name] = {"score": score, "cached": False}
        return {"results": [{"policies": verdicts}]}

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m uniguard.peer", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.checkpoint, args.threads), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
