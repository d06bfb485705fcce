"""
The G-effect (the paper's Definition 1), measured inside any unlearning run: the dot product
between the gradient of a risk and the gradient of the step's loss,

    e_u(t) = grad R(D_u; theta_t) . grad L(theta_t),    e_r(t) = grad R(D_r; theta_t) . grad L(theta_t)

R is the NLL of the answer tokens (token mean), D_u the step's forget batch, D_r --geffect-retain of
the 400 held-out retain rows spread evenly over them (the same at every step; --geffect-dr step takes
each step's own retain batch instead, the paper's D_t minus D_u), L the step's loss
(objective + regularizer). A gradient step changes R by about -lr * e: e_u < 0 means removal,
e_r >= 0 retention (Figure 1). Values are split by parameter group (embed, shallow, middle,
deep = the decoder layers in thirds, lm = final norm and output layer), by decoder layer, by
loss term (objective, regularizer), and with --geffect-pointwise per forget sample (the
PG-effect of eq. 5: the risk gradient . grad log p(s_u) of each sample). Each row also says what the
real optimizer step did to each risk against what e predicts (--geffect-order 1, the default, or 2 with
the second-order term; Probe._delta).

    python wga.py --split forget05 --geffect-every 1              # writes RUN_DIR/geffect.jsonl

Token weights (Appendix F.2): wga.py, tnpo.py and wtnpo.py with --log-token-weights write each forget answer's
per-token weights at every step (RUN_DIR/token_weights.jsonl; TokenLog).

This file measures and logs; figures.py draws from the logs (`python figures.py geffect RUN... -o FILE`:
Figure 3's layout; `panels`, `pointwise`, `tokens`, `delta`: the paper's other figures).

How it is cheap: the run's own backward pass gives grad L; grad R(D_u) comes from the same
forward graph (kept for one more backward at measured steps); the regularizer's gradient is
routed into the one extra gradient buffer while the objective's stays in .grad; the risk
gradients are never stored: per-parameter hooks take their dot products as backward produces
them. With --geffect-pointwise or --geffect-order >= 1 the two risk gradients are kept until the
step (two more gradient copies); order 2 also keeps a copy of the trainable weights.

Dropout: training keeps the model config's dropout, as TOFU's code does (model.train(), the reference
model in eval mode), and the probe measures in the step's mode: grad R(D_u) comes from the step's own
forward, D_r's forward runs in training mode too. With dropout (GPT-2's default 0.1) e is a noisy
sample and KL at theta_o is not 0; for a deterministic G-effect set the config's dropout to 0.
Groups are found by structure (common.decoder_layers), so any architecture works; see param_groups.

Under torchrun (FSDP2) the hooks see this process's shards of each gradient: the dot products
are taken shard by shard and summed over the processes with one all-reduce per measured step;
D_r is dealt out in equal shares; the step deltas (orders 1, 2) are summed the same way.
--geffect-pointwise runs in one process only.
"""
import json
import math
from pathlib import Path

import torch

import common

GROUPS = ("embed", "shallow", "middle", "deep", "lm")


def add_flags(parser):
    """The G-effect flags of every method script."""
    a = parser.add_argument
    a("--geffect-every", type=int, default=0, help="measure the G-effect every N steps (0 = off)")
    a("--geffect-retain", type=int, default=40, help="D_r: N of the 400 held-out retain rows, spread evenly over "
                                                     "them (every author for N >= 40)")
    a("--geffect-dr", choices=("heldout", "step"), default="heldout",
      help="D_r of the retaining G-effect: the --geffect-retain held-out rows, or each step's own retain batch "
           "(the paper's D_t minus D_u, as in the authors' code)")
    a("--geffect-pointwise", action="store_true", help="also the PG-effect of every forget sample (eq. 5)")
    a("--geffect-order", type=int, choices=(0, 1, 2), default=1,
      help="what the real step did to each risk, beside the G-effect's -lr*e: nothing (0), the actual change and "
           "grad R . (the update) (1), and also the second-order term 1/2 (update)^T H_R (update) (2: one more "
           "backward per risk, at the new weights)")


def check_flags(args):
    """Raise UsageError on bad G-effect flags (before anything is loaded or written)."""
    if args.geffect_every < 0 or not 1 <= args.geffect_retain <= common.N_EVAL:
        raise common.UsageError(f"--geffect-every must be >= 0 and --geffect-retain in 1..{common.N_EVAL} "
                                f"(the held-out retain rows)")
    procs = common.world()[1]
    if args.geffect_every and procs > 1:
        if args.geffect_pointwise:
            raise common.UsageError("--geffect-pointwise runs in one process only (not under torchrun)")
        if args.geffect_dr == "heldout" and args.geffect_retain % procs:
            raise common.UsageError(f"--geffect-retain ({args.geffect_retain}) must be a multiple of the "
                                    f"{procs} processes")
    if getattr(args, "log_token_weights", False) and procs > 1:  # each process holds only its share of the rows
        raise common.UsageError("--log-token-weights runs in one process only (not under torchrun)")


def param_groups(model) -> list:
    """(name, parameter, group, decoder layer or None) for every trainable parameter, matched by
    identity, not by name: the parameters of decoder layer i (common.decoder_layers) go to layer i and
    its third, 'shallow', 'middle' or 'deep'; the input embeddings (get_input_embeddings) and any other
    nn.Embedding outside the layers (GPT-2's position embeddings wpe) to 'embed'; everything else
    (final norm, output layer) to 'lm'. A tied input/output matrix (GPT-2, Qwen2 with
    tie_word_embeddings) is one parameter: it is counted once, in 'embed', and 'lm' then holds the
    final norm only. Raises UsageError when the decoder layers cannot be found."""
    layers = common.decoder_layers(model)
    n = len(layers)
    layer_of = {}
    for i, layer in enumerate(layers):  # contiguous thirds, the first ones one longer when n is not a multiple of 3
        third = 0 if i < (n + 2) // 3 else 1 if i < (n + 2) // 3 + (n + 1) // 3 else 2
        for p in layer.parameters():
            layer_of.setdefault(id(p), (GROUPS[1 + third], i))
    try:
        embeddings = [model.get_input_embeddings()]
    except NotImplementedError:  # some remote-code models; their nn.Embedding modules are found below
        embeddings = []
    embeddings += [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    embed = {id(p) for m in embeddings if m is not None for p in m.parameters()}
    out = []
    for name, p in model.named_parameters():  # a tied matrix comes once, under its first (input) name
        if not p.requires_grad:
            continue
        if id(p) in layer_of:
            out.append((name, p, *layer_of[id(p)]))
        else:
            out.append((name, p, "embed" if id(p) in embed else "lm", None))
    return out


def spread(n: int, total: int = common.N_EVAL) -> list:
    """`n` row indices spread evenly over range(total): one in each of n equal cells, the offset in the
    cell cycling 0, 1, 2, ... so that the rows do not all hold the same question of their author's
    block (for 40 of the 400 held-out rows: row 10a + a % 10 of author a)."""
    cell = total / n
    return [int(i * cell) + i % max(1, int(cell)) for i in range(n)]


class Probe:
    """Measures the G-effect at every --geffect-every-th step. The method loop calls
    `probe.backward(loss, reg, logp, mask, forget_batch)` in place of `(loss + reg).backward()`."""

    def __init__(self, args, model, tokenizer, retain_rows, run_dir):
        self.every, self.pointwise = args.geffect_every, args.geffect_pointwise
        self.order = getattr(args, "geffect_order", 0)
        self.beta = getattr(args, "beta", None)
        self.model, self.pending, self.waiting = model, None, None
        check_flags(args)
        if not self.every:
            return
        self.pad = tokenizer.pad_token_id
        self.params = param_groups(model)
        self.n_layers = model.config.num_hidden_layers
        self.step_dr = args.geffect_dr == "step"  # D_r: the step's retain batch, from the loop's micro-batches
        self.d_r, self.d_r_tok = [], 0
        if not self.step_dr:  # D_r: held-out retain rows spread evenly over the 400
            d_r = common.encode_rows(tokenizer, args.template, [retain_rows[i] for i in spread(args.geffect_retain)])
            self.d_r_tok = common.n_answer(d_r)  # answer tokens of all of D_r (R is their mean)
            d_r = common.shard(d_r)  # under torchrun, each process's equal share
            # D_r in one batch, or, when --grad-accum asks for them (memory), in micro-batches of the rows
            # a training micro-batch has on this process (equal shares: every process does as many)
            per_process = math.ceil(math.ceil(args.batch_size / args.grad_accum) / common.world()[1])
            micro = per_process if args.grad_accum > 1 else len(d_r)
            self.d_r = [common.collate(d_r[k:k + micro], self.pad, model.device) for k in range(0, len(d_r), micro)]
        self.file = open(Path(run_dir) / "geffect.jsonl", "w") if common.is_main() else None
        self.mode, self.kept, self.extra, self.dots, self.store, self.stash = None, [], None, {}, None, None
        self.step_vec = self.curv = None  # --geffect-order 2: theta_t+1 - theta_t and its dot products
        # order 1, every step, held-out D_r: R(D_r; theta_t+1) is the next step's R(D_r; theta_t), which its
        # G-effect computes anyway; a row waits for it instead of paying one more forward of D_r
        self.reuse_dr = self.order == 1 and self.every == 1 and not self.step_dr
        for i, (_, p, _, _) in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda p, i=i: self._hook(i, p))

    def active(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0  # step is 0-based: the first measure is at theta_o

    # ---- the loop's backward
    def backward(self, loss, reg, logp, mask, forget_batch):
        step, last = forget_batch["step"], forget_batch["last"]
        if not self.active(step):
            (loss + reg).backward()
            return
        loss.backward(retain_graph=True)  # .grad collects the objective's gradient; the graph stays for R(D_u)
        if reg.requires_grad:
            self.extra = self.extra or [None] * len(self.params)
            self._stream("route", reg)  # the regularizer's gradient goes to the extra buffer
        self.kept.append((logp, mask, forget_batch))
        if last:
            self._measure(step)

    # ---- per-parameter hooks: while a mode is set, .grad holds only the gradient backward just made
    def _hook(self, i, p):
        if self.mode is None:
            return
        g, p.grad = p.grad, None  # take it: .grad is put back to the step's gradient after the backward
        if self.mode == "route":  # the regularizer's gradient goes to the one extra buffer
            self.extra[i] = g if self.extra[i] is None else self.extra[i].add_(g)
            return
        if self.mode == "after":  # --geffect-order 2: grad R(theta_t+1) . (theta_t+1 - theta_t)
            self.curv[i] += self._dot(g, self.step_vec[i])
            return
        reg = None if self.extra is None else self.extra[i]
        for term, vec in (("objective", self.stash[i]), ("reg", reg)):  # 'dot': a risk gradient
            if vec is not None:  # in float32 at least (a bf16 dot would round), summed in float64;
                # under FSDP each process dots its own shards and _measure sums over processes
                a, b = common.local(g).flatten(), common.local(vec).flatten()
                if a.dtype in (torch.float16, torch.bfloat16):
                    a, b = a.float(), b.float()
                self.dots[(self.mode, term)][i] += torch.dot(a, b).double()
        if self.store is not None:  # --geffect-pointwise keeps the risk gradients
            self.store[i] = g if self.store[i] is None else self.store[i].add_(g)

    def _stream(self, mode, scalar, retain_graph=False):
        """Backward `scalar` with the hooks in `mode`, leaving .grad as it was."""
        self.stash = [p.grad for _, p, _, _ in self.params]
        for _, p, _, _ in self.params:
            p.grad = None
        self.mode = mode
        scalar.backward(retain_graph=retain_graph)
        self.mode = None
        for (_, p, _, _), g in zip(self.params, self.stash):
            p.grad = g
        self.stash = None

    def _measure(self, step):
        terms = ("objective", "reg") if self.extra is not None else ("objective",)
        dev = self.params[0][1].device
        self.dots = {(d, t): torch.zeros(len(self.params), dtype=torch.float64, device=dev)
                     for d in ("unlearn", "retain") for t in terms}
        saved = {}
        # R(D_u): the token-mean NLL of the forget batch, backward through the kept forward graphs
        n_u = self.kept[0][2]["n_tok"]  # answer tokens of the whole step (all processes)
        risk_u = -sum((lp * m).sum() for lp, m, _ in self.kept) / n_u
        risk = dict(unlearn=risk_u.item(), retain=0.0)  # this process's share of R(theta_t)
        keep = self.order > 0 or self.pointwise  # the risk gradients, kept until the step is taken (delta)
        self.store = [None] * len(self.params) if keep else None
        self._stream("unlearn", risk_u, retain_graph=self.pointwise)
        saved["unlearn"] = self.store
        # R(D_r): the held-out retain sample, or the step's own retain batch; a forward and backward of its own
        self.store = [None] * len(self.params) if keep else None
        last = self.kept[-1][2]
        d_r, d_r_tok = (last["step_retain"], last["retain_tok"]) if self.step_dr else (self.d_r, self.d_r_tok)
        risk["retain"] = self._stream_risk("retain", d_r, d_r_tok)
        saved["retain"] = self.store
        self.store = None
        if common.world()[1] > 1:  # one all-reduce: the shards' dot products add up to the full ones
            import torch.distributed as dist
            keys = list(self.dots)
            flat = torch.stack([self.dots[k] for k in keys])
            dist.all_reduce(flat)
            self.dots = dict(zip(keys, flat))
        row = dict(step=step + 1)
        for d in ("unlearn", "retain"):
            row[d] = self._aggregate(sum(self.dots[(d, t)] for t in terms))
        if self.extra is not None:
            row["terms"] = {t: {d: self.dots[(d, t)].sum().item() for d in ("unlearn", "retain")} for t in terms}
        if self.pointwise:
            row["pointwise"] = self._pointwise(saved)
        # .grad becomes the step's full gradient: objective + regularizer
        if self.extra is not None:
            for (_, p, _, _), e in zip(self.params, self.extra):
                if e is not None:
                    p.grad = e if p.grad is None else p.grad.add_(e)
        # what the optimizer step will do is measured after it (step): grad R . theta now, so that
        # grad R . (theta_t+1 - theta_t) needs no copy of theta; with order 2 a copy all the same
        params = [p for _, p, _, _ in self.params]
        forget = [fb for _, _, fb in self.kept]
        self.extra, self.kept, self.dots = None, [], {}
        if self.order == 0:
            self._write(row)
            return
        self.pending = dict(row=row, risk=risk, saved=saved, forget=forget, n_u=n_u, d_r=d_r, d_r_tok=d_r_tok,
                            dot_before={d: self._dots(saved[d], params) for d in saved},
                            before=[p.detach().clone() for p in params] if self.order == 2 else None)

    def _stream_risk(self, mode, batches, n_tok) -> float:
        """R of `batches` (answer-token NLL over n_tok, this process's share), a forward and a backward per
        batch with the hooks in `mode`; in the step's mode, the random state put back after (_same_rng)."""
        total = 0.0
        with self._same_rng(self.params[0][1].device):
            for b in batches:
                lp, m = common.answer_logprobs(self.model, b)
                r = -(lp * m).sum() / n_tok
                total += r.item()
                self._stream(mode, r)
        return total

    @staticmethod
    def _same_rng(dev):
        """Forwards in the step's mode (training: dropout if the config has some), with the random state
        put back after, so that a probed run draws the same dropout masks as an unprobed one."""
        return torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])

    @staticmethod
    def _dot(a, b) -> torch.Tensor:
        """a . b in float64 over this process's shards (float32 products are exact in float64)."""
        return torch.dot(common.local(a).flatten().double(), common.local(b).flatten().double())

    def _dots(self, vectors, params) -> torch.Tensor:
        """Per parameter, vector . parameter in float64 (0 where no vector)."""
        out = torch.zeros(len(params), dtype=torch.float64, device=params[0].device)
        for i, (v, p) in enumerate(zip(vectors, params)):
            if v is not None:
                out[i] = self._dot(v, p.detach())
        return out

    def _risk(self, batches, n_tok):
        """R of `batches` (answer-token NLL over n_tok), this process's share, without a graph; in the
        step's mode, the random state put back after (_same_rng)."""
        with torch.no_grad(), self._same_rng(self.params[0][1].device):
            return sum(float(-(lp * m).sum() / n_tok) for lp, m in
                       (common.answer_logprobs(self.model, b) for b in batches))

    # ---- the loop's optimizer step
    def step(self, optimizer, max_grad_norm, step):
        """common.clip_and_step; after a measured step, what it did to each risk (the row's "delta")."""
        norm = common.clip_and_step(self.model, optimizer, max_grad_norm, step)
        if self.pending is not None:
            self._delta(optimizer.param_groups[0]["lr"])
        return norm

    def _delta(self, lr):
        """The row's "delta" for D_u and D_r, with theta_t+1 in place and d = theta_t+1 - theta_t:
        - actual: R(theta_t+1) - R(theta_t), one more forward of each set (of D_u only with reuse_dr:
          the row then waits for the next step's R(D_r), _complete);
        - gradient: -lr * e, the paper's first-order prediction of a plain gradient step;
        - update: grad R(theta_t) . d, the first-order prediction of the real step (clipping, AdamW,
          weight decay, schedule), as grad R . theta_t+1 - grad R . theta_t;
        - second_order (--geffect-order 2): update + 1/2 d^T H d, with d^T H d taken as
          (grad R(theta_t+1) - grad R(theta_t)) . d: exactly d^T H d for H the Hessian of R averaged
          along the step, so the expansion is exact for a quadratic R and its error, like that of the
          Taylor term with H at theta_t, is O(|d|^3) (tested). It costs one backward per risk at
          theta_t+1, whose forward also gives `actual`, and a copy of theta_t; per group too."""
        pend, self.pending = self.pending, None
        params = [p for _, p, _, _ in self.params]
        dev = params[0].device
        update = {d: self._dots(pend["saved"][d], params) - pend["dot_before"][d] for d in pend["saved"]}
        pend["saved"] = None  # the risk gradients of theta_t are spent
        sets = dict(unlearn=(pend["forget"], pend["n_u"]), retain=(pend["d_r"], pend["d_r_tok"]))
        keys = ("unlearn", "retain")
        after, curv = {}, {}
        if self.order == 1:
            after = {d: self._risk(b, n) if not (d == "retain" and self.reuse_dr) else 0.0
                     for d, (b, n) in sets.items()}
        else:
            self.step_vec = pend["before"]
            for s, p in zip(self.step_vec, params):
                s.neg_().add_(p.detach())  # d = theta_t+1 - theta_t, in the copy's place
            for d, (batches, n) in sets.items():  # R and its gradient at theta_t+1, dotted with d by the hooks
                self.curv = torch.zeros(len(params), dtype=torch.float64, device=dev)
                after[d] = self._stream_risk("after", batches, n)
                curv[d] = self.curv
            self.step_vec = self.curv = None
        flat = torch.cat([torch.tensor([pend["risk"][d], after[d]], dtype=torch.float64, device=dev) for d in keys]
                         + [update[d] for d in keys] + [curv[d] for d in keys if d in curv])
        if common.world()[1] > 1:  # the processes' shares of the risks and of the dot products
            import torch.distributed as dist
            dist.all_reduce(flat)
        n = len(params)
        row = pend["row"]
        row["lr"], row["delta"] = lr, {}
        for k, d in enumerate(keys):
            before, now = flat[2 * k].item(), flat[2 * k + 1].item()
            u = flat[4 + k * n:4 + (k + 1) * n]
            rec = dict(actual=now - before, gradient=-lr * row[d]["total"], update=u.sum().item(), risk=before,
                       groups=dict(update={g: v for g, v in self._aggregate(u).items() if g in GROUPS}))
            if curv:  # update + 1/2 (grad R(theta_t+1) - grad R(theta_t)) . d = 1/2 (both gradients) . d
                second = 0.5 * (u + flat[4 + (2 + k) * n:4 + (3 + k) * n])
                rec["second_order"] = second.sum().item()
                rec["groups"]["second_order"] = {g: v for g, v in self._aggregate(second).items() if g in GROUPS}
            row["delta"][d] = rec
        if not self.reuse_dr:
            self._write(row)
            return
        self._complete(flat[2].item())  # the previous row's R(D_r; theta_t+1) is this one's R(D_r; theta_t)
        self.waiting = row

    def _complete(self, risk_r):
        """Write the waiting row, its D_r "actual" now known from R(D_r) at the weights after its step."""
        if self.waiting is not None:
            rec = self.waiting["delta"]["retain"]
            rec["actual"] = risk_r - rec["risk"]
            self._write(self.waiting)
            self.waiting = None

    def _write(self, row):
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def _aggregate(self, per_param) -> dict:
        out = {g: 0.0 for g in GROUPS}
        layers = [0.0] * self.n_layers
        vals = per_param.tolist()
        for (_, _, group, layer), v in zip(self.params, vals):
            out[group] += v
            if layer is not None:
                layers[layer] += v
        return dict(total=sum(vals), **out, layers=layers)

    def _pointwise(self, saved) -> list:
        """PG-effect (eq. 5): for each forget sample, grad R(D) . grad log p(s_u), the whole answer's log-prob."""
        rows, items = [], [(lp, m, fb, j) for lp, m, fb in self.kept for j in range(lp.shape[0])]
        for k, (lp, m, fb, j) in enumerate(items):
            g = torch.autograd.grad((lp[j] * m[j]).sum(), [p for _, p, _, _ in self.params],
                                    retain_graph=k + 1 < len(items), allow_unused=True)
            rec = {f"pg_{d}": sum((gi.double() * s.double()).sum().item() for gi, s in zip(g, saved[d])
                                   if gi is not None and s is not None) for d in ("unlearn", "retain")}
            rec["logp"] = (lp[j] * m[j]).sum().item()
            if "ref_logp" in fb:
                rec["ref_logp"] = (fb["ref_logp"][j] * m[j]).sum().item()
                if self.beta is not None:  # NPO's sequence weight w_npo (eq. 4) for this sample
                    rec["w_npo"] = 2 * torch.sigmoid(torch.tensor(self.beta * (rec["logp"] - rec["ref_logp"]))).item()
            rows.append(rec)
        return rows

    def close(self):
        """Write the last rows: one waiting for R(D_r) after its step (one forward), and a measured row whose
        step was never taken (a loop that ended without probe.step); close."""
        if self.waiting is not None:
            r = torch.tensor([self._risk(self.d_r, self.d_r_tok)], dtype=torch.float64, device=self.params[0][1].device)
            if common.world()[1] > 1:
                import torch.distributed as dist
                dist.all_reduce(r)
            self._complete(r.item())
        if self.pending is not None:
            self._write(self.pending["row"])
            self.pending = None
        if self.every and self.file is not None:
            self.file.close()


# ----------------------------------------------------------------------------- token weights (Appendix F.2)
# --log-token-weights (wga.py, tnpo.py, wtnpo.py) writes the weight the loss gave each answer token of each forget
# row at every step; `figures.py tokens` draws them as the paper's EP1..EP5 lines, one token shaded per weight.

class TokenLog:
    """RUN_DIR/token_weights.jsonl, one JSON row per forget row of every step's batch:
    {"step": 1-based, "epoch": 1-based, "row": index in the split, "question", "tokens": the answer's
    tokens as text (EOS included), "weights": the loss's weight of each}. A no-op without the flag."""

    def __init__(self, args, tokenizer, forget_rows, run_dir):
        self.file = None
        if not getattr(args, "log_token_weights", False) or not common.is_main():
            return
        self.tokenizer, self.forget_rows, self.pieces = tokenizer, forget_rows, {}
        self.file = open(Path(run_dir) / "token_weights.jsonl", "w")

    def write(self, forget_batch, mask, weight):
        """The rows of one micro-batch: weight is the loss's detached B x (T-1) weight, aligned with mask."""
        if self.file is None:
            return
        targets = forget_batch["input_ids"][:, 1:]  # position t predicts token t+1, as in token_logprobs
        for b, row in enumerate(forget_batch["rows"]):
            m = mask[b]
            if row not in self.pieces:  # the same answer every epoch: decode it once
                self.pieces[row] = token_pieces(self.tokenizer, targets[b][m].tolist())
            self.file.write(json.dumps(dict(step=forget_batch["step"] + 1, epoch=forget_batch["epoch"], row=row,
                                            question=self.forget_rows[row]["question"], tokens=self.pieces[row],
                                            weights=weight[b][m].tolist())) + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def token_pieces(tokenizer, ids) -> list:
    """Each token's text: what it adds to the decoded text so far, so that the pieces join back to
    the text (a SentencePiece token decoded alone loses its leading space); a token that ends inside a
    multi-byte character falls back to its own decoding."""
    pieces, before = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1])
        pieces.append(text[len(before):] if text.startswith(before) else tokenizer.decode(ids[i:i + 1]))
        before = text
    return pieces
