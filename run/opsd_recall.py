"""OPSD on the embedded SmolLM2 on a few KGFact facts: recall and the GT answer's NLL before/after.

    python run/opsd_recall.py --facts 4 --steps 16 --lr 2e-4 --out /tmp/opsd_recall

Recall = the boxed GT answer (the entity) appears in the greedy reply (40 new tokens) to the
training question; the NLL is the per-token NLL of the GT assistant text. Prints one JSON object
with the replies, the divergence per step, and the load average and core count (figures taken on a
busy machine mislead).
"""

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="rollout length")
    ap.add_argument("--out", default="/tmp/opsd_recall")
    args = ap.parse_args()

    import jax.numpy as jnp

    from mixsd_jax.data.kgfact import TRAIN_FILE, build_kgfact
    from mixsd_jax.data.records import gold_answer, read_records
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.registry import EMBEDDED_DEFAULT, pull
    from mixsd_jax.models.tokenizer import load_tokenizer
    from mixsd_jax.sampling.engine import generate
    from mixsd_jax.train.batches import BatchPlan, tokenize_records
    from mixsd_jax.train.config import load_train_config
    from mixsd_jax.train.loop import train
    from mixsd_jax.train.step import micro_batch_sums

    started, load_start = time.time(), os.getloadavg()
    here = Path(args.out)
    model_dir = pull(EMBEDDED_DEFAULT)
    tok = load_tokenizer(model_dir)
    if not (here / "kg" / TRAIN_FILE).exists():
        build_kgfact(here / "kg", preset="tiny", seed=0)
    records = read_records(here / "kg" / TRAIN_FILE)[: args.facts]
    data = here / "facts.jsonl"
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    n = len(records)

    def measure(params, cfg):
        outs = generate(params, cfg, [tok.prompt_ids(r.user) for r in records], stop_ids=tok.stop_ids,
                        max_new_tokens=40, batch_size=n)
        replies = [tok.decode(o.tokens) for o in outs]
        hits = [gold_answer(r.assistant).lower() in t.lower() for r, t in zip(records, replies)]
        tokenized = tokenize_records(tok, records, max_seq_len=512)
        batch = BatchPlan(tokenized.examples, batch_size=n, grad_accum=1, seed=0, max_seq_len=512).host_batch(0)
        nll, (count, _) = micro_batch_sums(params, cfg, {k: jnp.asarray(v[0]) for k, v in batch.items()}, jnp.float32)
        return {"recall": sum(hits) / n, "hits": hits, "gt_nll_per_token": round(float(nll) / float(count), 4),
                "replies": replies}

    cfg, base = load_hf(model_dir)
    before = measure(base, cfg)
    out = here / f"run_{n}_{args.steps}_{args.lr:g}"
    tcfg = load_train_config(None, [
        f"model={model_dir}", f"data={data}", f"out={out}", "method=opsd", f"steps={args.steps}", f"batch_size={n}",
        f"lr={args.lr}", "max_seq_len=512", "seed=0", "mesh.data=1", "opsd.num_rollouts=1",
        f"opsd.max_new_tokens={args.max_new_tokens}", f"opsd.loss_chunk={args.max_new_tokens}", "save_every=0",
    ])
    t0 = time.time()
    train(tcfg, progress=False)
    train_s = time.time() - t0
    _, tuned = load_hf(out / "hf")
    after = measure(tuned, cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({
        "facts": n, "steps": args.steps, "lr": args.lr, "train_s": round(train_s, 1),
        "total_s": round(time.time() - started, 1), "answers": [gold_answer(r.assistant) for r in records],
        "divergence_per_step": [round(r["loss"], 4) for r in rows],
        "agreement_per_step": [round(r["accuracy"], 3) for r in rows],
        "before": before, "after": after,
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_cores": os.cpu_count(),
    }, indent=1))


if __name__ == "__main__":
    main()
