"""The upcycling demonstration (docs/upcycling.md): a dense GLA trained on text, upcycled to E
experts top-k by each partition method, post-trained N steps, against the dense model continued
for the same N steps and a dense model at equal active parameters trained from scratch.

    python scripts/upcycle_demo.py --out demo                 # the GPU recipe (text_gla_dense)
    python scripts/upcycle_demo.py --out demo_cpu --small     # a tiny CPU version of the pipeline

Every arm runs through the lcsm command line (lcsm.cli.main.main in this process):

    dense       lcsm train text_gla_dense --set out_dir=OUT/dense --set steps=S
    moe_SPLIT   lcsm upcycle OUT/dense --experts E --top-k K --split SPLIT --out OUT/moe_SPLIT
                lcsm eval OUT/moe_SPLIT -o OUT/moe_SPLIT/eval-init.json        (right after conversion)
                lcsm train OUT/moe_SPLIT/config.yaml --init-from OUT/moe_SPLIT --set steps=N ...
    dense_cont  lcsm train OUT/dense/config.yaml --init-from OUT/dense --set out_dir=OUT/dense_cont --set steps=N ...
    dense_small lcsm train text_gla_dense --set model.channel_mixer.hidden_ratio=4·K/E --set steps=S+N
                (the same active parameters per token as the MoE arms, save the routers; from scratch)

The post-training arms share one schedule (--post-lr, --post-warmup, cosine to 0.1·lr, fresh
AdamW) and the same data order. A finished arm (its eval.json written) is skipped, so the script
can be rerun after an interruption. Writes OUT/results.md and OUT/results.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lcsm.cli.main import main as lcsm
from lcsm.run.evaluate import load_run, read_eval

RECIPE = "text_gla_dense"
SMALL = [  # the CPU version: a tiny GLA on 128-byte windows, one thread (a shared machine)
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "task.seq_len=128", "batch_size=8", "threads=1",
]


def run(*argv: str) -> None:
    print("$ lcsm " + " ".join(argv), flush=True)
    code = lcsm(list(argv))
    if code != 0:
        sys.exit(f"lcsm {argv[0]} failed with exit code {code}")


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def eval_at(run_dir: Path, step: int) -> dict | None:
    """The eval record of a run at `step` from its metrics.jsonl, or None."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "eval" and record.get("step") == step:
            return record
    return None


def final(run_dir: Path) -> dict:
    return read_eval(run_dir / "eval.json").metrics  # (the eval schema: lcsm/run/evaluate.py)


def sizes(run_dir: Path) -> tuple[int, int, str]:
    recipe, model, _, _ = load_run(run_dir)
    ch = recipe.model.channel_mixer
    if ch.kind == "moe":
        ffn = f"{ch.experts}×{ch.hidden_size}, top-{ch.top_k}" + (f" + shared {ch.shared_hidden_size}" if ch.shared_expert else "")
    else:
        ffn = f"GLU {model.blocks[0].channel_mixer.gate_proj.out_features}"
    return model.num_parameters(), model.active_parameters(), ffn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="upcycle_demo", help="output folder (default upcycle_demo)")
    p.add_argument("--dense-steps", type=int, help="steps of the dense run (default: the recipe's, 1000; --small 60)")
    p.add_argument("--post-steps", type=int, help="post-training steps N (default 200; --small 20)")
    p.add_argument("--post-lr", type=float, default=1e-3, help="peak learning rate of the post-training (default 1e-3)")
    p.add_argument("--post-warmup", type=int, help="post-training warmup steps (default N/10)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--splits", default="random,clustering,importance", help="comma-separated partition methods")
    p.add_argument("--shared", type=int, default=0, help="neurons in a shared expert (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (every arm)")
    p.add_argument("--small", action="store_true", help="the tiny CPU version (proves the pipeline, measures nothing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the dense recipe (and so of every arm), e.g. --set model.d_model=256")
    args = p.parse_args(argv)

    out = Path(args.out)
    S = args.dense_steps or (60 if args.small else 1000)
    N = args.post_steps or (20 if args.small else 200)
    warm = args.post_warmup if args.post_warmup is not None else max(1, N // 10)
    E, K = args.experts, args.top_k
    # the recipe's warmup (100 of 1000 steps) scaled to a shorter dense run (a warmup beyond the run is refused)
    base = (SMALL if args.small else []) + [f"schedule.warmup_steps={min(100, max(1, S // 10))}"] + args.set + [f"device={args.device}"]
    post = [f"steps={N}", f"optimizer.lr={args.post_lr}", f"schedule.warmup_steps={warm}", f"eval_every={max(1, N // 4)}",
            f"device={args.device}"]

    dense = out / "dense"
    if not (dense / "eval.json").exists():
        run("train", RECIPE, *sets(base + [f"out_dir={dense}", f"steps={S}", f"eval_every={max(1, S // 4)}"]),
            *(["--resume", "auto"] if (dense / "checkpoint").exists() else []))
    arms = []
    for split in args.splits.split(","):
        moe = out / f"moe_{split}"
        if not (moe / "upcycle.json").exists():
            run("upcycle", str(dense), "--experts", str(E), "--top-k", str(K), "--split", split, "--shared", str(args.shared),
                "--device", args.device, "--out", str(moe), "--overwrite")
        if not (moe / "eval-init.json").exists():
            run("eval", str(moe), "--device", args.device, "-o", str(moe / "eval-init.json"))
        if not (moe / "eval.json").exists():
            again = ["--resume", "auto"] if (moe / "metrics.jsonl").exists() else ["--init-from", str(moe)]
            run("train", str(moe / "config.yaml"), *sets(post), *again)
        arms.append((f"upcycled, {split}", moe, read_eval(moe / "eval-init.json").metrics))
    cont = out / "dense_cont"
    if not (cont / "eval.json").exists():
        again = ["--resume", "auto"] if (cont / "metrics.jsonl").exists() else ["--init-from", str(dense)]
        run("train", str(dense / "config.yaml"), *sets(post + [f"out_dir={cont}", "name=dense_cont"]), *again)
    arms.insert(0, ("dense, continued", cont, final(dense)))
    small = out / "dense_small"
    if not (small / "eval.json").exists():
        ratio = 4.0 * K / E  # text_gla_dense: 4·d_model neurons; an MoE token uses K/E of them
        run("train", RECIPE, *sets(base + [f"out_dir={small}", f"steps={S + N}", f"eval_every={S}",
                                           f"model.channel_mixer.hidden_ratio={ratio}", "name=dense_small"]),
            *(["--resume", "auto"] if (small / "checkpoint").exists() else []))
    arms.append((f"dense at equal active ({S}+{N} steps from scratch)", small, eval_at(small, S)))

    rows = []
    for label, run_dir, before in arms:
        total, active, ffn = sizes(run_dir)
        after = final(run_dir)
        rows.append({"arm": label, "run": str(run_dir), "ffn": ffn, "parameters": total, "active": active,
                     "loss_at_conversion": before["loss"] if before else None, "loss_after": after["loss"],
                     "bpb_after": after.get("bits_per_byte")})
    head = (f"| arm | FFN per layer | params | active/token | eval loss at step {S} (conversion) | "
            f"eval loss after {N} more steps | bits/byte after |\n|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['arm']} | {r['ffn']} | {r['parameters'] / 1e6:.3f}M | {r['active'] / 1e6:.3f}M | "
             + ("—" if r["loss_at_conversion"] is None else f"{r['loss_at_conversion']:.4f}")
             + f" | {r['loss_after']:.4f} | " + ("—" if r["bpb_after"] is None else f"{r['bpb_after']:.4f}") + " |" for r in rows]
    table = head + "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"dense_steps": S, "post_steps": N, "experts": E, "top_k": K, "rows": rows}, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
