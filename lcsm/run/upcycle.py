"""Mixture-of-experts from a dense run, as in LLaMA-MoE and LLaMA-MoE-v2: `lcsm upcycle`.

    upcycle(run, out, experts=E, top_k=K, split=..., shared=N, ...) -> UpcycleResult

Every layer's dense GLU, W_down(act(W_gate x) ⊙ W_up x) with H neurons, is a sum over its neurons,
so splitting the neurons into disjoint sets gives experts whose outputs add up to the dense one
exactly. `shared` neurons (N) become an always-on shared expert, the other H - N are split into E
routed experts of (H - N)/E neurons each (rows of W_gate and W_up, columns of W_down). The MoE
layer computes

    y = scale · Σ_{e ∈ top-k} w_e GLU_e(x) + GLU_shared(x),   w = renormalised top-k of softmax(W_r x)

With top_k = E, a zero router (w_e = 1/E) and scale = E this is the dense GLU to round-off; with
1 < top_k < E, scale = E keeps the routed part's expected size (k experts of E, weights summing
to one, times E: each chosen expert's output × ≈ E/k). With top_k = 1 the weight is the raw
probability (Switch), ≈ 1/E at a near-uniform router, so the routed part starts near 1/E of its
dense size whatever the split. LLaMA-MoE-v2 uses scale 4.0 for 8 experts top-2 and 1.0 for its
shared + 7 top-1 (tuned, not exact); pass --scale for those.

Splits (how the routed neurons are partitioned; docs/upcycling.md):
  random      a seeded permutation.
  clustering  balanced spherical k-means of the neurons' gate vectors (rows of W_gate, unit
              length): neurons that fire on the same inputs share an expert; exactly equal sizes.
  importance  LLaMA-MoE-v2's split: the MLP inputs of a few batches of the run's own training
              data clustered (balanced spherical k-means) into E token clusters; each neuron's
              importance per cluster (mean |a ⊙ ∂L/∂a| at the down projection's input, SNIP, or
              mean |a|); the shared expert = the N neurons in most clusters' top-(m + N) lists
              (m = an expert's size); each expert then takes its cluster's most important
              remaining neurons (greedily, balanced).
Router (W_r [E, d]): `centroid` (default) — importance: the token clusters' centroids (so a token
goes to the experts of the clusters it is nearest to); random and clustering: the mean unit gate
vector of each expert's neurons (the expert's score is its neurons' mean normalised gate
pre-activation); `zero` (uniform; exact at top_k = E); `random`, N(0, 0.02²).

Attention experts (`attention_experts` G): every EOS and attention mixer gets head_routing with G
groups of heads, its weights unchanged; the head router starts at zero with `router: zero`, else
N(0, 0.02²) (a zero router at top_k < G would send every token to the same groups); its scale is G.

The result is a run directory: config.yaml (the dense recipe with the MoE spec, out_dir = the new
directory), checkpoint/init/ as an *init checkpoint* (model.safetensors with metadata step 0,
init=upcycle, source, source_step, and a manifest.json of its size and SHA-256; no trainer state;
lcsm/run/checkpoint.py), upcycle.json (what was done, and each layer's neuron partition) and the
run's tokenizer.json if it has one. Every file is claimed in OUT/.lcsm-files.jsonl before it is
written, and OUT is locked (OUT/.lcsm.lock) while upcycle works; --overwrite removes only lcsm's
files there. `lcsm train OUT/config.yaml --init-from OUT` (or `--resume auto`) post-trains it with
a fresh optimizer; the init checkpoint stays beside the run's step checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lcsm.config.base import RecipeError
from lcsm.config.recipe import DEVICE, Recipe, load_recipe
from lcsm.nn.model import Model
from lcsm.run.checkpoint import save_init_weights, write_text
from lcsm.run.device import resolve_device
from lcsm.run.evaluate import load_run
from lcsm.run import files, lock
from lcsm.run.rundir import remove_owned
from lcsm.tasks import TaskError, build_task, epoch_batches

SPLITS = ("random", "clustering", "importance")
ROUTERS = ("centroid", "zero", "random")
IMPORTANCE = ("gradient", "activation")
MAX_TOKENS = 16384  # MLP inputs kept per layer for the importance split (a seeded subsample)
RECORD = "upcycle.json"


class UpcycleError(RecipeError):
    """Bad arguments to upcycle; the message names the command-line flag (the keyword argument of
    the same name in the Python API). lcsm exits with code 2."""


@dataclass
class UpcycleResult:
    run_dir: Path
    recipe: Recipe
    record: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- partitions (pure torch)


def balanced_assign(score: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """score [n, k] (higher is better), sizes: k capacities summing to n -> labels [n] long.

    Greedy over all (item, cluster) pairs from the best score down: an item takes the cluster of
    its best remaining pair that still has room. Every cluster ends with exactly its size."""
    n, k = score.shape
    if sum(sizes) != n:
        raise ValueError(f"sizes {sizes} must add up to n = {n}")
    order = torch.argsort(score.flatten(), descending=True, stable=True).tolist()
    labels, room, left = [-1] * n, list(sizes), n
    for flat in order:  # a plain loop over Python ints: ~n·k steps, fast enough for 10⁵ pairs
        i, c = divmod(flat, k)
        if labels[i] < 0 and room[c] > 0:
            labels[i] = c
            room[c] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(points: torch.Tensor, k: int, seed: int = 0, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means with equal cluster sizes (n // k, the first n % k clusters one more).

    points [n, D] are compared by cosine (each scaled to unit length); k-means++ seeding from a
    torch.Generator(seed); assignments by balanced_assign. Returns (labels [n] long, centroids
    [k, D]: the mean of each cluster's unit vectors)."""
    x = F.normalize(points.double(), dim=1)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"{n} points cannot fill {k} clusters")
    sizes = [n // k + (c < n % k) for c in range(k)]
    gen = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    for _ in range(1, k):  # k-means++: the next seed far (in cosine) from those chosen
        dist = (1 - (x @ x[chosen].T).max(dim=1).values).clamp_min(0) ** 2
        chosen.append(int(torch.multinomial(dist, 1, generator=gen)) if dist.sum() > 0 else int(torch.randint(n, (1,), generator=gen)))
    centroids = x[chosen]
    labels = None
    for _ in range(iters):
        new = balanced_assign(x @ F.normalize(centroids, dim=1).T, sizes)
        centroids = torch.stack([x[new == c].mean(0) for c in range(k)])
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
    return labels, centroids


def _groups(labels: torch.Tensor, k: int, neurons: torch.Tensor) -> torch.Tensor:
    """[k, m]: the neuron ids of each label, sorted."""
    return torch.stack([neurons[labels == c].sort().values for c in range(k)])


def magnitude(glu) -> torch.Tensor:
    """[H] a data-free importance of each GLU neuron: ‖w_gate‖·‖w_up‖·‖w_down‖ (its output's scale
    for a unit input along its gate direction)."""
    return glu.gate_proj.weight.norm(dim=1) * glu.up_proj.weight.norm(dim=1) * glu.down_proj.weight.norm(dim=0)


def split_weights(glu, experts: int, shared: int, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """random or clustering: (shared ids [N], expert ids [E, m], router [E, d]).

    Shared: the N neurons of largest magnitude(); router: each expert's mean unit gate vector."""
    gate = glu.gate_proj.weight.detach().double()
    H = gate.shape[0]
    order = torch.argsort(magnitude(glu).detach(), descending=True, stable=True)
    shared_ids, routed = order[:shared].sort().values, order[shared:].sort().values
    if split == "random":
        gen = torch.Generator().manual_seed(seed)
        ids = routed[torch.randperm(routed.numel(), generator=gen)].view(experts, -1).sort(dim=1).values
    else:
        labels, _ = balanced_kmeans(gate[routed], experts, seed)
        ids = _groups(labels, experts, routed)
    unit = F.normalize(gate, dim=1)
    router = torch.stack([unit[row].mean(0) for row in ids])
    assert ids.numel() + shared_ids.numel() == H
    return shared_ids, ids, router


def split_importance(x: torch.Tensor, score: torch.Tensor, experts: int, shared: int, seed: int):
    """LLaMA-MoE-v2's split from data: x [N, d] MLP inputs, score [N, H] per-token neuron importance
    -> (shared ids [S], expert ids [E, m], router [E, d] = the token clusters' centroids)."""
    H = score.shape[1]
    m = (H - shared) // experts
    labels, centroids = balanced_kmeans(x, experts, seed)
    per_cluster = torch.stack([score[labels == c].double().mean(0) for c in range(experts)])  # [E, H]
    total = per_cluster.sum(0)
    if shared:
        # the neurons in most clusters' top lists of m + shared (what its expert and the shared one
        # could hold): a neuron every cluster needs is in all of them (ties: the larger total importance)
        top = torch.zeros(H, dtype=torch.float64)
        for c in range(experts):
            top[torch.topk(per_cluster[c], m + shared).indices] += 1
        key = top * (total.max() * 2 + 1) + total  # count first, then importance
        shared_ids = torch.topk(key, shared).indices.sort().values
    else:
        shared_ids = torch.zeros(0, dtype=torch.long)
    keep = torch.ones(H, dtype=torch.bool)
    keep[shared_ids] = False
    routed = torch.arange(H)[keep]
    labels = balanced_assign(per_cluster[:, routed].T, [m] * experts)
    return shared_ids, _groups(labels, experts, routed), centroids


@torch.no_grad()
def _no_grad_forward(model, tokens, labels):
    return model(tokens, labels)


def neuron_statistics(model: Model, recipe: Recipe, run_dir: Path, batches: int, measure: str, device: torch.device,
                      seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (x [N, d] the channel mixer's inputs, score [N, H] each neuron's importance per
    token) over the first `batches` training batches of the run (at most MAX_TOKENS tokens, a
    seeded subsample). measure: "gradient" = |a ⊙ ∂L/∂a| (a: the down projection's input, L the
    mean training loss of the batch), "activation" = |a|."""
    try:
        data = build_task(recipe.task, recipe.seed, run_dir=run_dir, train=True)
    except TaskError as e:
        raise UpcycleError(f"--split importance: cannot build the run's data ({e})") from None
    order = epoch_batches(data.train, recipe.batch_size, recipe.seed, 0)[:batches]
    model = model.to(device).eval()
    glus = [block.channel_mixer for block in model.blocks]
    seen: list[dict] = [{} for _ in glus]
    hooks = []
    for glu, box in zip(glus, seen):
        glu.fused = False  # the down projection as a module, its input seen by the hook below
        hooks.append(glu.register_forward_pre_hook(lambda m, a, box=box: box.update(x=a[0])))
        hooks.append(glu.down_proj.register_forward_pre_hook(lambda m, a, box=box: box.update(a=a[0])))
    xs, scores = [[] for _ in glus], [[] for _ in glus]
    try:
        for seg_index, rows in order:
            seg = data.train[seg_index]
            tokens, labels = seg.inputs[rows].to(device), seg.labels[rows].to(device)
            if measure == "gradient":
                loss = model(tokens, labels)
                grads = torch.autograd.grad(loss, [box["a"] for box in seen])
                for n, (box, g) in enumerate(zip(seen, grads)):
                    scores[n].append((box["a"] * g).abs().detach().flatten(0, -2).float().cpu())
            else:
                _no_grad_forward(model, tokens, labels)
                for n, box in enumerate(seen):
                    scores[n].append(box["a"].abs().flatten(0, -2).float().cpu())
            for n, box in enumerate(seen):
                xs[n].append(box["x"].detach().flatten(0, -2).float().cpu())
    finally:
        for h in hooks:
            h.remove()
        for glu in glus:
            del glu.fused  # back to the class default
    out = []
    gen = torch.Generator().manual_seed(seed)
    for x, s in zip(xs, scores):
        x, s = torch.cat(x), torch.cat(s)
        if x.shape[0] > MAX_TOKENS:
            pick = torch.randperm(x.shape[0], generator=gen)[:MAX_TOKENS]
            x, s = x[pick], s[pick]
        out.append((x, s))
    return out


def _fill(new: Model, dense: Model, layers: list[dict], router: str, shared: int) -> None:
    """Copy the dense weights into the MoE model `new`: everything but the channel mixers as it is,
    each layer's experts (and shared expert) sliced from its GLU, the routers initialised."""
    src, dst = dense.state_dict(), new.state_dict()
    filled = set()
    with torch.no_grad():
        for name, t in dst.items():
            if name in src and ".channel_mixer." not in name:
                if src[name].shape != t.shape:
                    raise RuntimeError(f"upcycle: {name} has shape {tuple(src[name].shape)} in the dense model, {tuple(t.shape)} here")
                t.copy_(src[name])
                filled.add(name)
        for l, (block, layer) in enumerate(zip(new.blocks, layers)):
            glu, moe_mod = dense.blocks[l].channel_mixer, block.channel_mixer
            G, U, D = glu.gate_proj.weight, glu.up_proj.weight, glu.down_proj.weight  # [H,d], [H,d], [d,H]
            ids = layer["experts"]
            moe_mod.w_gate.copy_(G[ids].transpose(1, 2))  # [E,m,d] -> [E,d,m]
            moe_mod.w_up.copy_(U[ids].transpose(1, 2))
            moe_mod.w_down.copy_(D[:, ids].permute(1, 2, 0))  # [d,E,m] -> [E,m,d]
            r = moe_mod.router.weight
            if router == "centroid":
                r.copy_(layer["centroid"].to(r.dtype))
            elif router == "zero":
                r.zero_()
            else:
                r.normal_(0.0, 0.02)
            if shared:
                s = layer["shared"]
                moe_mod.shared.gate_proj.weight.copy_(G[s])
                moe_mod.shared.up_proj.weight.copy_(U[s])
                moe_mod.shared.down_proj.weight.copy_(D[:, s])
            filled.update(f"blocks.{l}.channel_mixer.{n}" for n, _ in moe_mod.named_parameters())
            hr = getattr(block.mixer, "head_routing", None)
            if hr is not None:
                if router == "zero":
                    hr.router.proj.weight.zero_()
                else:
                    hr.router.proj.weight.normal_(0.0, 0.02)
                filled.update(f"blocks.{l}.mixer.head_routing.{n}" for n, _ in hr.named_parameters())
    missing = sorted(set(dst) - filled)
    if missing:
        raise RuntimeError(f"upcycle: no dense weights for {', '.join(missing[:5])}")


# --------------------------------------------------------------------------- the command


def _check(flag: str, ok: bool, message: str) -> None:
    if not ok:
        raise UpcycleError(f"{flag}: {message}")


def _mixers(spec) -> list[tuple[str, object]]:
    return [("mixer", spec.mixer), *((f"mixers.{n}", m) for n, m in spec.mixers.items())]


def _check_out(out: Path, overwrite: bool) -> list[str]:
    """The names of lcsm's files already in `out` (another upcycle's, a run's); refuses a name lcsm
    writes held by a file lcsm did not write (even with --overwrite), lcsm's files without
    --overwrite, and other files without --overwrite (lcsm then writes beside them)."""
    mine = {p.split("/")[0] for p in files.owned(out)}
    present = files.entries(out)
    foreign = [n for n in present if n not in mine]
    clash = [n for n in foreign if n in files.NAMES]
    if clash:
        raise UpcycleError(f"--out: {out}: {', '.join(clash)} {'was' if len(clash) == 1 else 'were'} not written by lcsm; lcsm "
                           "neither removes nor overwrites files it did not write: move them away, or choose another --out")
    existing = [n for n in files.NAMES if n in present and n in mine]
    if existing and not overwrite:
        raise UpcycleError(f"--out: {out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UpcycleError(f"--out: {out} holds files lcsm did not write ({shown}); choose another --out, or pass --overwrite "
                           "to write beside them (lcsm removes and overwrites only files it wrote)")
    return existing


def upcycle(
    run: str | Path,
    out: str | Path,
    *,
    experts: int,
    top_k: int,
    split: str = "clustering",
    shared: int = 0,
    scale: float | None = None,
    router: str = "centroid",
    importance: str = "gradient",
    batches: int = 8,
    attention_experts: int | None = None,
    attention_top_k: int | None = None,
    attention_scale: float | None = None,
    aux_loss_weight: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    device: str = "auto",
    log: Callable[[str], None] = lambda s: None,
) -> UpcycleResult:
    """Convert the dense run `run` into an MoE run directory `out` (see the module docstring).
    Raises UpcycleError (a RecipeError) for bad arguments, naming the flag."""
    _check("--split", split in SPLITS, f"unknown split '{split}'; allowed: {', '.join(SPLITS)}")
    _check("--router", router in ROUTERS, f"unknown router init '{router}'; allowed: {', '.join(ROUTERS)}")
    _check("--importance", importance in IMPORTANCE, f"unknown importance '{importance}'; allowed: {', '.join(IMPORTANCE)}")
    _check("--experts", experts >= 2, f"at least 2 experts (got {experts})")
    _check("--top-k", 1 <= top_k <= experts, f"top-k = {top_k} must be in 1..--experts = {experts}")
    _check("--shared", shared >= 0, f"a number of neurons >= 0 (got {shared})")
    _check("--scale", scale is None or scale > 0, f"must be > 0 (got {scale})")
    _check("--batches", batches >= 1, f"at least 1 (got {batches})")
    _check("--aux-loss-weight", aux_loss_weight is None or aux_loss_weight >= 0, f"must be >= 0 (got {aux_loss_weight})")
    _check("--device", bool(DEVICE.match(device)), f"unknown device '{device}'; allowed: auto, cpu, cuda, cuda:N, mps")
    if attention_experts is None:
        _check("--attention-top-k", attention_top_k is None and attention_scale is None, "needs --attention-experts G")
    else:
        _check("--attention-experts", attention_experts >= 2, f"at least 2 head groups (got {attention_experts})")
        _check("--attention-top-k", attention_top_k is not None, "give the head groups each token uses, 1..--attention-experts")
        _check("--attention-top-k", 1 <= attention_top_k <= attention_experts,
               f"top-k = {attention_top_k} must be in 1..--attention-experts = {attention_experts}")
        _check("--attention-scale", attention_scale is None or attention_scale > 0, f"must be > 0 (got {attention_scale})")

    recipe, dense, src_dir, step = load_run(run, torch.device("cpu"))
    out = Path(out)
    _check("--out", out.resolve() != src_dir.resolve(), "the new run directory must not be the dense run itself")
    spec = recipe.model
    channel = spec.channel_mixer
    _check("RUN", channel.kind == "glu",
           f"{src_dir}: channel_mixer is '{channel.kind}'; upcycling splits a dense GLU channel mixer (kind: glu) into "
           "experts" + (" (this run is already a mixture of experts)" if channel.kind == "moe" else ""))
    hidden = dense.blocks[0].channel_mixer.gate_proj.out_features
    _check("--shared", shared < hidden, f"{shared} shared neurons leave none of the dense GLU's {hidden} to route")
    routed = hidden - shared
    fits = [e for e in range(2, min(routed, 64) + 1) if routed % e == 0]
    _check("--experts", routed % experts == 0,
           f"{experts} experts must divide the routed neurons: the dense GLU has {hidden}"
           + (f", less --shared {shared}: {routed}" if shared else "")
           + (f"; experts that fit: {', '.join(map(str, fits))}" if fits else "; change --shared"))
    if attention_experts is not None:
        for where, m in _mixers(spec):
            heads = m.heads or spec.n_heads
            _check("--attention-experts", heads % attention_experts == 0,
                   f"{attention_experts} head groups must divide the heads of {where} ({heads})")
            _check("--attention-experts", m.head_routing is None, f"{where} already has head_routing")

    if out.exists() and not out.is_dir():
        raise UpcycleError(f"--out: {out} exists and is not a directory")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UpcycleError(f"--out: cannot create {out} ({e.strerror})") from None
    held = lock.acquire(out, "run directory", log)  # while it is written: no lcsm train into it meanwhile
    done = False
    try:
        existing = _check_out(out, overwrite)

        m_size = (hidden - shared) // experts
        scale = float(experts) if scale is None else float(scale)
        moe = {"kind": "moe", "experts": experts, "top_k": top_k, "hidden_size": m_size, "activation": channel.activation,
               "output_scale": scale}
        if shared:
            moe.update(shared_expert=True, shared_hidden_size=shared)
        if aux_loss_weight is not None:
            moe["aux_loss_weight"] = aux_loss_weight
        data = recipe.resolved()
        model_data = data["model"]
        model_data["channel_mixer"] = moe
        head = None
        if attention_experts is not None:
            head = {"groups": attention_experts, "top_k": attention_top_k,
                    "scale": float(attention_experts) if attention_scale is None else float(attention_scale)}
            if aux_loss_weight is not None:
                head["aux_loss_weight"] = aux_loss_weight
            model_data["mixer"]["head_routing"] = dict(head)
            for m in (model_data.get("mixers") or {}).values():
                m["head_routing"] = dict(head)
        data.update(out_dir=str(out), name=out.name or recipe.name)
        try:
            new_recipe = load_recipe(data)
        except RecipeError as e:  # (the checks above should have caught it: say what was written)
            raise UpcycleError(f"--out: the upcycled recipe is invalid: {e}") from None

        # ---- partition every layer's neurons
        stats = None
        if split == "importance":
            dev = resolve_device(device)
            log(f"importance: {importance} over {batches} batches of {src_dir}'s training data on {dev}")
            stats = neuron_statistics(dense, recipe, src_dir, batches, importance, dev, seed)
            dense = dense.to("cpu")
        layers = []
        for l, block in enumerate(dense.blocks):
            glu = block.channel_mixer
            if stats is None:
                shared_ids, ids, centroid = split_weights(glu, experts, shared, split, seed + l)
            else:
                x, score = stats[l]
                _check("--batches", x.shape[0] >= experts, f"{x.shape[0]} tokens cannot form {experts} clusters; use more batches")
                shared_ids, ids, centroid = split_importance(x, score, experts, shared, seed + l)
            layers.append({"shared": shared_ids, "experts": ids, "centroid": centroid})

        # ---- the new model: the dense weights copied, the experts sliced from each GLU
        with torch.random.fork_rng(devices=[]):  # the random router init, without touching the caller's RNG
            torch.manual_seed(seed)
            new = Model(new_recipe.model)
            _fill(new, dense, layers, router, shared)

        # ---- the run directory (locked; every file claimed in its lcsm-files manifest before it is written)
        if existing:
            kept = remove_owned(out)  # only lcsm's own files (--overwrite)
            if kept:
                log(f"--overwrite: kept {', '.join(kept)} in {out}: they hold files lcsm did not write")
        files.claim(out, "config.yaml", RECORD)
        write_text(out / "config.yaml", yaml.safe_dump(new_recipe.resolved(), sort_keys=False, allow_unicode=True))
        save_init_weights(out, new, "upcycle", {"source": src_dir, "source_step": step})  # checkpoint/init/ (claimed there)
        if (src_dir / "tokenizer.json").exists():
            files.claim(out, "tokenizer.json")
            write_text(out / "tokenizer.json", (src_dir / "tokenizer.json").read_text())
        record = {
            "source": str(src_dir), "source_step": step, "experts": experts, "top_k": top_k, "split": split,
            "importance": importance if split == "importance" else None, "batches": batches if split == "importance" else None,
            "shared": shared, "scale": scale, "router": router, "seed": seed, "dense_hidden": hidden, "expert_hidden": m_size,
            "attention": head,
            "parameters": {"dense": dense.num_parameters(), "dense_active": dense.active_parameters(),
                           "total": new.num_parameters(), "active": new.active_parameters()},
            "layers": [{"shared": layer["shared"].tolist(), "experts": layer["experts"].tolist()} for layer in layers],
        }
        write_text(out / RECORD, json.dumps(record, indent=1) + "\n")
        result = UpcycleResult(out, new_recipe, record)
        done = True
        return result
    finally:
        held.release()
        if created and not done:
            try:
                out.rmdir()  # (only if nothing was written into it)
            except OSError:
                pass
