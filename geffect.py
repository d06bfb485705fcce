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
    python geffect.py plot out/wga-tiny-forget05 out/npo-tiny-forget05 -o geffect.png [--symlog]   # -> out/geffect.png

The paper's other figures, from logged runs: `panels` (runs side by side, titled and laid out by the
flags that differ: NPO over beta, RMU over layer x c, GD/KL/RR; Figures 4/11, 12, 8) and `pointwise`
(NPO's w_npo against each sample's PG-effect, from --geffect-pointwise runs; Figures 5b, 16, 17):

    python geffect.py panels RUN_b0.5 RUN_b1 RUN_b2 --cols beta -o npo_beta.png
    python geffect.py pointwise RUN_b0.5 RUN_b1 RUN_b2 --steps 5 10 15 [--separate] -o pointwise.png

Token weights (Appendix F.2): wga.py, tnpo.py and wtnpo.py with --log-token-weights write each forget answer's
per-token weights at every step (RUN_DIR/token_weights.jsonl); `tokens` shades the answers by them, epoch by epoch:

    python geffect.py tokens out/tnpo-tiny-forget05 out/wtnpo-tiny-forget05 --rows 0 1 -o tw.html   # + out/tw.png

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
import os
import textwrap
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
# row at every step; `geffect.py tokens` draws them as the paper's EP1..EP5 lines, one token shaded per weight.

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


def read_tokens(run_dir) -> tuple:
    """(method name, {(row, epoch): logged row}) of a run folder; raises UsageError."""
    path = Path(run_dir) / "token_weights.jsonl"
    if not path.is_file():
        raise common.UsageError(f"{path} does not exist: run wga.py, tnpo.py or wtnpo.py with --log-token-weights")
    keys = {"row", "epoch", "step", "question", "tokens", "weights"}
    try:
        rows = {}
        for line in filter(str.strip, open(path)):
            r = json.loads(line)
            if not isinstance(r, dict) or not keys <= r.keys() or not r["tokens"] \
                    or len(r["tokens"]) != len(r["weights"]):
                raise ValueError(f"a row needs {', '.join(sorted(keys))}, with one weight per token: {line.strip()[:80]}")
            rows[(r["row"], r["epoch"])] = r
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise common.UsageError(f"{path} is not valid token-weight JSON Lines: {e}")
    if not rows:
        raise common.UsageError(f"{path} has no rows")
    try:  # the script that made the run
        method = str(read_args(run_dir).get("method", Path(run_dir).name)).upper()
    except (common.UsageError, AttributeError):
        method = Path(run_dir).name
    return method, rows


def token_colors(weights, top, cmap="Reds") -> list:
    """(background, text colour) hex pairs: the weight on 0..top, darker = higher, white text on dark."""
    import matplotlib
    cm = matplotlib.colormaps[cmap]
    out = []
    for w in weights:
        x = min(max(w / top, 0.0), 1.0) if top > 0 else 0.0
        out.append((matplotlib.colors.to_hex(cm(x)), "#ffffff" if x > 0.6 else "#000000"))
    return out


def _token_data(run_dirs, rows, epochs, scale):
    """Checked input of `tokens`: [(name, method, {(row, epoch): logged row}, top)], questions, rows, epochs."""
    runs = []
    for d in run_dirs:
        method, logged = read_tokens(d)
        have_rows, have_epochs = sorted({r for r, _ in logged}), sorted({e for _, e in logged})
        for r in rows:
            if r not in have_rows:
                some = ", ".join(map(str, have_rows)) if len(have_rows) <= 8 else \
                    f"{len(have_rows)} of them, {have_rows[0]}..{have_rows[-1]}"
                raise common.UsageError(f"forget row {r} is not in {Path(d) / 'token_weights.jsonl'} (it has rows "
                                        f"{some})")
        for e in epochs or have_epochs:
            if e not in have_epochs:
                raise common.UsageError(f"epoch {e} is not in {Path(d) / 'token_weights.jsonl'} (it has epochs "
                                        f"{', '.join(map(str, have_epochs))})")
        runs.append([d, method, logged, have_epochs])
    epochs = epochs or runs[0][3]
    for d, _, logged, _ in runs:
        for r in rows:
            for e in epochs:
                if (r, e) not in logged:
                    raise common.UsageError(f"forget row {r} at epoch {e} is not in {Path(d) / 'token_weights.jsonl'}")
    questions = {r: runs[0][2][(r, epochs[0])]["question"] for r in rows}
    for d, _, logged, _ in runs[1:]:
        if any(logged[(r, epochs[0])]["question"] != questions[r] for r in rows):
            raise common.UsageError(f"{d} has other forget rows than {runs[0][0]}: compare runs on one split")
    shown = lambda logged: [w for r in rows for e in epochs for w in logged[(r, e)]["weights"]]
    shared = max(max(shown(logged)) for _, _, logged, _ in runs)
    out = [(d, method, logged, shared if scale == "shared" else max(shown(logged))) for d, method, logged, _ in runs]
    return out, questions, epochs


TOKENS_CSS = """
body { font-family: sans-serif; max-width: 70em; margin: 1em auto; color: #222; }
.q { font-weight: bold; margin: 0.3em 0 0.6em; }
h3 { font-size: 1em; margin: 0.8em 0 0.2em; }
.run { font-weight: normal; color: #777; font-size: 0.85em; }
.bar { display: inline-block; width: 10em; height: 0.8em; vertical-align: middle; border: 1px solid #bbb;
       margin: 0 0.4em; }
.line { font-family: monospace; white-space: pre-wrap; line-height: 1.7; margin: 0.1em 0; }
.ep { display: inline-block; width: 3.5em; color: #555; }
.t { box-shadow: inset -1px 0 #fff; }
"""


def tokens_html(runs, questions, epochs, scale) -> str:
    """The page: per forget row its question, then per run and epoch the answer, each token shaded by its weight."""
    from html import escape
    bar = ", ".join(c for c, _ in token_colors([k / 8 for k in range(9)], 1.0))
    what = ("one scale for all runs" if scale == "shared" else "one scale per run") + \
        ", from 0 (white) to the largest weight shown (darkest)"
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>Token weights</title>',
           f"<style>{TOKENS_CSS}</style></head><body>", "<h1>Token weights</h1>",
           f"<p>Each answer token's background is its weight in the run's loss at the step of that epoch that saw the "
           f"row (darker = higher; {escape(what)}). Hover a token for its weight, an EP label for its step.</p>"]
    for r, q in questions.items():
        out.append(f"<h2>Forget row {r}</h2><p class=\"q\">Question: {escape(q)}</p>")
        for d, method, logged, top in runs:
            out.append(f'<h3>{escape(method)} <span class="run">{escape(Path(d).name)}</span> '
                       f'<span class="run">0</span><span class="bar" style="background: linear-gradient(to right, '
                       f'{bar})"></span><span class="run">{top:.3g}</span></h3>')
            for e in epochs:
                rec = logged[(r, e)]
                spans = "".join(f'<span class="t" style="background:{bg};color:{fg}" title="{w:.4g}">{escape(t)}</span>'
                                for t, w, (bg, fg) in zip(rec["tokens"], rec["weights"],
                                                          token_colors(rec["weights"], top)))
                out.append(f'<div class="line"><span class="ep" title="step {rec["step"]}">EP{e}</span>{spans}</div>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def tokens_png(runs, questions, epochs, scale, path):
    """The page's content as an image: each token a text box coloured by its weight, the paper's EP lines."""
    plt = _pyplot()
    from matplotlib.font_manager import FontProperties
    width, dpi, size = 1100, 100, 9  # pixels, dots per inch, font points
    font, bold = FontProperties(size=size), FontProperties(size=size + 1, weight="bold")
    scratch = plt.figure(dpi=dpi)
    renderer = scratch.canvas.get_renderer()
    measure = lambda s, f=font: renderer.get_text_width_height_descent(s, f, ismath=False)[0]
    line, gap, left, indent = 17, 2, 10, 50
    items, bars, y = [], [], 8  # (x, y from the top, text, font, box colours), colour bars; pixels
    for r, q in questions.items():
        y += line + 4
        items.append((left, y, f"Forget row {r}. {q}", bold, None))
        for d, method, logged, top in runs:
            y += line + 2
            label = f"{method}  ({Path(d).name})   0"
            items.append((left, y, label, font, None))
            x = left + measure(label) + 6
            bars.append((x, y, top))
            items.append((x + 126, y, f"{top:.3g}" + ("  (shared scale)" if scale == "shared" else ""), font, None))
            for e in epochs:
                y += line
                items.append((left + 8, y, f"EP{e}", font, None))
                x = left + indent
                rec = logged[(r, e)]
                for t, (bg, fg) in zip(rec["tokens"], token_colors(rec["weights"], top)):
                    shown = t.strip() or "\u2423"  # the PNG separates tokens by a gap; a bare space shows as a mark
                    x += measure(" ") if t[:1].isspace() and x > left + indent else 0
                    w = measure(shown)
                    if x + w > width - left:  # wrap, indented
                        x, y = left + indent, y + line
                    items.append((x, y, shown, font, (bg, fg)))
                    x += w + gap
    height = y + line
    width = min(width, max(x + measure(text, f) for x, _, text, f, _ in items) + 2 * left)  # no blank margin
    plt.close(scratch)
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    for x, yy, text, f, colors in items:
        kw = dict(bbox=dict(boxstyle="square,pad=0.12", fc=colors[0], ec="none"), color=colors[1]) if colors else {}
        fig.text(x / width, 1 - yy / height, text, fontproperties=f, va="baseline", ha="left", parse_math=False,
                 **kw)
    grad = [[k / 63 for k in range(64)]]
    for x, yy, _ in bars:
        ax = fig.add_axes((x / width, 1 - (yy + 1) / height, 120 / width, 10 / height))
        ax.imshow(grad, cmap="Reds", aspect="auto", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    tmp = f"{path}.tmp.png"
    try:
        fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return tmp


def tokens_page(run_dirs, out, rows, epochs, scale="run") -> str:
    """Write the token-weight page FILE.html and its image FILE.png (figure_path; each atomically,
    nothing written on bad input); returns the HTML's path."""
    if Path(str(out)).suffix.lower() not in (".html", ".htm"):
        raise common.UsageError(f"-o must name an .html file (the image goes beside it as .png), got {out}")
    out = figure_path(out, page=True)
    if not rows or len(set(rows)) != len(rows):
        raise common.UsageError("--rows needs one or more distinct forget row indices")
    runs, questions, epochs = _token_data(run_dirs, rows, epochs, scale)
    png = str(Path(out).with_suffix(".png"))
    page = tokens_html(runs, questions, epochs, scale)
    tmp, tmp_png = f"{out}.tmp", f"{png}.tmp.png"
    try:
        tokens_png(runs, questions, epochs, scale, png)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp_png, png)
        os.replace(tmp, out)
    finally:  # nothing half-written
        for t in (tmp, tmp_png):
            if os.path.exists(t):
                os.remove(t)
    return out


# ----------------------------------------------------------------------------- plots

def read_run(run_dir) -> tuple:
    """(geffect rows, log rows) of a run folder; raises UsageError when it has no geffect.jsonl."""
    path = Path(run_dir) / "geffect.jsonl"
    if not path.is_file():
        raise common.UsageError(f"{path} does not exist: run a method script with --geffect-every N first")
    try:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        log_path = Path(run_dir) / "log.jsonl"
        log = [json.loads(line) for line in open(log_path) if line.strip()] if log_path.is_file() else []
    except json.JSONDecodeError as e:
        raise common.UsageError(f"{path} is not valid JSON Lines: {e}")
    if not rows:
        raise common.UsageError(f"{path} has no rows")
    return rows, log


def read_args(run_dir) -> dict:
    """A run folder's args.json (the flags it ran with), plus `method` from its command (npo.py -> npo);
    raises UsageError when there is none."""
    path = Path(run_dir) / "args.json"
    try:
        args = json.loads(path.read_text())
    except FileNotFoundError:
        raise common.UsageError(f"{path} does not exist: the figure needs the flags of each run")
    except json.JSONDecodeError as e:
        raise common.UsageError(f"{path} is not valid JSON: {e}")
    if "command" in args:
        args = dict(method=Path(str(args["command"]).split()[0]).stem, **args)
    return args


def figure_path(out, page=False) -> str:
    """A bare file name goes under out/ (git-ignored), as run folders do; a path with a folder is kept.
    Raises UsageError for a folder that does not exist or (unless `page`: an HTML page the caller
    checked) a file type matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase
    out = str(out)
    kind = Path(out).suffix.lstrip(".").lower()
    if not page and kind not in FigureCanvasBase.get_supported_filetypes():
        raise common.UsageError(f"-o {out}: the name must end in an image type ({', '.join(sorted(FigureCanvasBase.get_supported_filetypes()))})")
    if os.path.dirname(out):
        if not os.path.isdir(os.path.dirname(out)):
            raise common.UsageError(f"-o {out}: the folder {os.path.dirname(out)} does not exist")
        return out
    common.OUT.mkdir(exist_ok=True)
    return str(common.OUT / out)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out, dpi) -> str:
    """Write the figure atomically (a temporary file, then os.replace) and close it."""
    plt = _pyplot()
    tmp = f"{out}.tmp{Path(out).suffix}"
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _legend_below(fig, handles, labels):
    """The widest legend that fits the canvas: 6 columns, else 4, else 2 (one per risk); then the
    panels leave it room at the bottom, measured rather than guessed."""
    fig.canvas.draw()
    for ncol in (6, 4, 2):
        legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
        box = legend.get_window_extent(fig.canvas.get_renderer())
        if box.width <= 0.98 * fig.bbox.width or ncol == 2:
            break
        legend.remove()
    fig.tight_layout(rect=(0, (box.height + 4) / fig.bbox.height, 1, 1))


def _two_row_grid(nrows, ncols, cells):
    """A figure of nrows x ncols cells, each a G-effect axis over a weight/risk axis (height 2:1);
    returns (fig, {cell: (top, bottom)}); cells not in `cells` are left blank."""
    plt = _pyplot()
    fig, grid = plt.subplots(2 * nrows, ncols, figsize=(4.2 * ncols, 5.2 * nrows), squeeze=False,
                             gridspec_kw=dict(height_ratios=[2, 1] * nrows))
    axes = {}
    for r in range(nrows):
        for c in range(ncols):
            if (r, c) in cells:
                axes[(r, c)] = (grid[2 * r][c], grid[2 * r + 1][c])
            else:
                grid[2 * r][c].axis("off")
                grid[2 * r + 1][c].axis("off")
    return fig, axes


def draw_panel(ax, ax2, rows, log, title, symlog=False, first_col=True):
    """One run in the paper's Figure 3 style: on `ax` the unlearning G-effect in red, retaining in
    blue, layer groups dashed (embed and lm dash-dotted); on `ax2` the method's weight (Figure 5a)
    or GA's inverse confidence (Figure 9c) and the forget risk (Figure 9b) from log.jsonl."""
    plt = _pyplot()
    styles = dict(embed="-.", shallow="--", middle="--", deep="--", lm="-.")
    shades = dict(embed=0.35, shallow=0.55, middle=0.7, deep=0.85, lm=0.45)
    steps = [r["step"] for r in rows]
    for key, cmap in (("unlearn", plt.cm.Reds), ("retain", plt.cm.Blues)):
        ax.plot(steps, [r[key]["total"] for r in rows], color=cmap(0.95), lw=2, label=f"{key}")
        for g in GROUPS:
            ax.plot(steps, [r[key][g] for r in rows], styles[g], color=cmap(shades[g]), lw=1, label=f"{key} {g}")
    ax.axhline(0, color="black", lw=0.5)
    if symlog:
        ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    if first_col:
        ax.set_ylabel("G-effect")
    key = next((k for k in ("weight", "inv_conf") if log and k in log[0]), None)
    if key:
        ax2.plot([x["step"] for x in log], [x[key] for x in log], color="tab:green", label=key)
        if key == "inv_conf":
            ax2.set_yscale("log")
        ax2.set_ylabel(key, color="tab:green")
    else:  # no weight in the log (RMU, PO): the left axis would be an empty 0-1 scale
        ax2.set_yticks([])
    if log:
        ax3 = ax2.twinx()
        ax3.plot([x["step"] for x in log], [x["forget_nll"] for x in log], color="tab:gray", label="forget NLL")
        ax3.set_ylabel("forget NLL (risk)", color="tab:gray")
    ax2.set_xlabel("step")


def plot(run_dirs, out, symlog=False, dpi=130):
    """The paper's Figure 3 style, one column per run (up to 4 a row), titled by the run folder's
    name (draw_panel), one legend below. Returns the path written (figure_path)."""
    runs = [(Path(d).name, *read_run(d)) for d in run_dirs]
    out = figure_path(out)
    ncols = min(len(runs), 4)
    nrows = -(-len(runs) // ncols)
    fig, axes = _two_row_grid(nrows, ncols, {divmod(i, ncols) for i in range(len(runs))})
    for i, (name, rows, log) in enumerate(runs):
        draw_panel(*axes[divmod(i, ncols)], rows, log, name, symlog, first_col=i % ncols == 0)
    _legend_below(fig, *axes[(0, 0)][0].get_legend_handles_labels())
    return _save(fig, out, dpi)


# ---- several runs of one method, side by side (Figures 4/11, 8, 12)

NOT_FLAGS = {"out", "command", "overwrite", "torch", "transformers"}  # args.json entries that name no setting


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _order(v):
    """Sort key for flag values: numbers by value, then everything else as text."""
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def panel_layout(args_list, names, rows_key=None, cols_key=None) -> list:
    """For the runs' args.json dicts: [(title, (row, col))] in the runs' order. Titles list the flags
    that every run has and whose values differ (the --rows and --cols keys first), e.g. "layer 3, c 5";
    the run folder's name where nothing differs. Rows and columns are the sorted values of the keys;
    without keys the runs fill rows of up to 4 in the order given. Raises UsageError for a key a run
    lacks or two runs in one cell."""
    keys = [k.replace("-", "_") if k else None for k in (rows_key, cols_key)]
    for k in filter(None, keys):
        for a, name in zip(args_list, names):
            if k not in a:
                raise common.UsageError(f"{name}: its args.json has no '{k}' (it has: "
                                        f"{', '.join(x for x in a if x not in NOT_FLAGS)})")
    # flags every run has (one that only some have comes from another method or version: `method` says it)
    shared = [k for k in args_list[0] if k not in NOT_FLAGS and all(k in a for a in args_list)]
    differ = [k for k in shared if len({json.dumps(a[k], sort_keys=True) for a in args_list}) > 1]
    differ = [k for k in keys if k] + [k for k in differ if k not in keys]
    titles = [textwrap.fill(", ".join(f"{k.replace('_', '-')} {_fmt(a[k])}" for k in differ), 50) or name
              for a, name in zip(args_list, names)]
    if not any(keys):
        ncols = min(len(args_list), 4)
        return [(t, divmod(i, ncols)) for i, t in enumerate(titles)]
    axis = [sorted({json.dumps(a[k]) for a in args_list}, key=lambda s: _order(json.loads(s))) if k else ["null"]
            for k in keys]
    cells, seen = [], {}
    for a, name, t in zip(args_list, names, titles):
        cell = tuple(ax.index(json.dumps(a[k])) if k else 0 for ax, k in zip(axis, keys))
        if cell in seen:
            raise common.UsageError(f"{seen[cell]} and {name} fall in the same cell ({t}): "
                                    f"choose --rows/--cols that tell them apart")
        seen[cell] = name
        cells.append((t, cell))
    return cells


def panels(run_dirs, out, rows_key=None, cols_key=None, symlog=False, dpi=110):
    """Runs side by side in a grid (Figures 4/11: NPO over beta; 12: RMU over layer x c; 8: GD vs KL
    vs RR), each drawn as `plot` draws it and titled by the flags that differ (panel_layout)."""
    runs = [read_run(d) for d in run_dirs]
    layout = panel_layout([read_args(d) for d in run_dirs], [Path(d).name for d in run_dirs], rows_key, cols_key)
    out = figure_path(out)
    nrows, ncols = (max(cell[i] for _, cell in layout) + 1 for i in (0, 1))
    fig, axes = _two_row_grid(nrows, ncols, {cell for _, cell in layout})
    for (rows, log), (title, cell) in zip(runs, layout):
        draw_panel(*axes[cell], rows, log, title, symlog, first_col=cell[1] == 0)
    _legend_below(fig, *axes[layout[0][1]][0].get_legend_handles_labels())
    return _save(fig, out, dpi)


# ---- NPO's weight against the point-wise G-effect (Figures 5b, 16, 17)

W_EDGES = (0.2, 0.4, 0.6, 0.8, 1.0)
W_LABELS = ("(0.0, 0.2]", "(0.2, 0.4]", "(0.4, 0.6]", "(0.6, 0.8]", "(0.8, 1.0]", "> 1.0")


def weight_group(w: float) -> int:
    """Index in W_LABELS of an NPO weight w_npo in [0, 2): the paper's five groups (lo, hi], and
    "> 1.0" for a sample now likelier than under theta_o (w_npo = 2 sigmoid(beta log p/p_o) > 1),
    which the paper's groups leave out. A w_npo of exactly 0 is float underflow of a tiny
    positive weight: first group."""
    import bisect
    if not w >= 0:  # also NaN
        raise ValueError(f"w_npo must be >= 0, got {w}")
    return bisect.bisect_left(W_EDGES, w)


def kde_grid(x, y, gx, gy):
    """Gaussian kernel density of the points (x, y) on the grid gx x gy (scipy's gaussian_kde: Scott's
    bandwidth, full covariance); None when the points span no area (fewer than 5, or on a line)."""
    import numpy as np
    from scipy.stats import gaussian_kde
    if len(x) < 5:
        return None
    try:
        kde = gaussian_kde(np.stack([x, y]))
    except np.linalg.LinAlgError:  # a singular covariance: the points lie on a line
        return None
    grid_x, grid_y = np.meshgrid(gx, gy)
    return kde(np.stack([grid_x.ravel(), grid_y.ravel()])).reshape(grid_x.shape)


def mass_levels(density, masses=(0.9, 0.5)) -> list:
    """Density thresholds whose upper sets hold the given shares of the grid's mass (the contours
    then enclose 90 % and 50 % of the estimated distribution), ascending."""
    import numpy as np
    z = np.sort(density.ravel())[::-1]
    cum = np.cumsum(z) / z.sum()
    return sorted({float(z[min(np.searchsorted(cum, m), len(z) - 1)]) for m in masses})


def _symlog(v, t):  # the coordinates the density is estimated in with --symlog
    import numpy as np
    return np.sign(v) * np.log10(1 + np.abs(v) / t)


def _symlog_inv(u, t):
    import numpy as np
    return np.sign(u) * t * (10 ** np.abs(u) - 1)


def pointwise_points(run_dir, steps) -> dict:
    """{step: [(pg_unlearn, pg_retain, w_npo), ...]} of an NPO run made with --geffect-pointwise;
    raises UsageError when it has no point-wise rows, no w_npo, or no row at a requested step."""
    rows, _ = read_run(run_dir)
    have = {r["step"]: r["pointwise"] for r in rows if r.get("pointwise")}
    if not have:
        raise common.UsageError(f"{run_dir} has no point-wise rows: run it with --geffect-pointwise")
    if not all("w_npo" in p for ps in have.values() for p in ps):
        raise common.UsageError(f"{run_dir}: its point-wise rows have no w_npo (only NPO runs log the weight)")
    missing = [s for s in steps if s not in have]
    if missing:
        raise common.UsageError(f"{run_dir} has no point-wise row at step {', '.join(map(str, missing))} "
                                f"(it has steps {min(have)}-{max(have)})")
    out = {}
    for s in steps:
        out[s] = [(p["pg_unlearn"], p["pg_retain"], p["w_npo"]) for p in have[s]]
        bad = [w for _, _, w in out[s] if not w >= 0]
        if bad:
            raise common.UsageError(f"{run_dir}: w_npo {bad[0]} at step {s} (a weight is >= 0)")
    return out


def pointwise_figure(run_dirs, steps=(5, 10, 15), separate=False, symlog=False):
    """The figure of `pointwise` (returned, not saved): one panel per run with the checkpoints at
    `steps` joined (Figure 16), or with `separate` one per run and step (Figure 17, a row per run)."""
    import numpy as np
    plt = _pyplot()
    runs = []
    for d in run_dirs:
        pts = pointwise_points(d, steps)
        beta = read_args(d).get("beta")
        if beta is None:
            raise common.UsageError(f"{d}/args.json has no beta")
        runs.append((_fmt(beta), pts))
    cells = []  # (title, points)
    for beta, pts in runs:
        if separate:
            cells += [(f"β = {beta}, step {s}", pts[s]) for s in steps]
        else:
            cells.append((f"β = {beta}, steps {', '.join(map(str, steps))}", [p for s in steps for p in pts[s]]))
    ncols = len(steps) if separate else min(len(cells), 4)
    nrows = -(-len(cells) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 4.0 * nrows), squeeze=False)
    for k in range(len(cells), nrows * ncols):
        grid.flat[k].axis("off")
    colors = [plt.cm.Blues(v) for v in (0.3, 0.45, 0.6, 0.78, 0.95)] + ["tab:orange"]
    for k, (title, pts) in enumerate(cells):
        ax = grid.flat[k]
        a = np.array(pts, dtype=float)  # n x 3: pg_unlearn, pg_retain, w_npo
        group = np.array([weight_group(w) for w in a[:, 2]])
        # --symlog: the density is estimated in sign(v) log10(1 + |v|/t) coordinates, t per axis
        # the 10th percentile of the nonzero |values| (matplotlib's symlog scale draws them alike)
        t = [max(np.quantile(np.abs(v[v != 0]), 0.1), 1e-12) if (v != 0).any() else 1.0 for v in a[:, :2].T]
        fwd = (lambda v, i: _symlog(v, t[i])) if symlog else (lambda v, i: v)
        inv = (lambda u, i: _symlog_inv(u, t[i])) if symlog else (lambda u, i: u)
        u = np.stack([fwd(a[:, i], i) for i in (0, 1)], 1)
        lo, hi = u.min(0), u.max(0)
        pad = np.where(hi > lo, hi - lo, 1.0) * 0.3  # room for the outer contour
        g = [np.linspace(lo[i] - pad[i], hi[i] + pad[i], 80) for i in (0, 1)]
        for j, label in enumerate(W_LABELS):
            sel = group == j
            if not sel.any():
                continue
            name = f"w_npo {label}" if j < 5 else f"w_npo {label} (outside the paper's groups)"
            ax.scatter(a[sel, 0], a[sel, 1], s=12, color=colors[j], alpha=0.85, linewidths=0 if j < 5 else 1,
                       marker="o" if j < 5 else "x", label=f"{name}: {int(sel.sum())}")
            z = kde_grid(u[sel, 0], u[sel, 1], *g)
            if z is not None:
                gx, gy = np.meshgrid(inv(g[0], 0), inv(g[1], 1))
                ax.contour(gx, gy, z, levels=mass_levels(z), colors=[colors[j]], linewidths=1.2)
        ax.axhline(0, color="black", lw=0.5)
        ax.axvline(0, color="black", lw=0.5)
        if symlog:
            ax.set_xscale("symlog", linthresh=t[0])
            ax.set_yscale("symlog", linthresh=t[1])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("unlearning PG-effect (D_u)")
        ax.set_ylabel("retaining PG-effect (D_r)")
        ax.legend(fontsize=6.5, title="samples per weight group", title_fontsize=6.5, loc="best", framealpha=0.8)
    fig.tight_layout()
    return fig


def pointwise(run_dirs, out, steps=(5, 10, 15), separate=False, symlog=False, dpi=110):
    """Write pointwise_figure to `out` (figure_path); returns the path."""
    out = figure_path(out)
    return _save(pointwise_figure(run_dirs, steps, separate, symlog), out, dpi)


def main(argv=None):
    parser = common.make_parser(__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plot", help="plot the G-effect of one or more runs")
    p.add_argument("runs", nargs="+", help="run folders with a geffect.jsonl")
    p.add_argument("-o", "--out", default="geffect.png", help="image file to write (a bare name goes under out/)")
    p.add_argument("--symlog", action="store_true", help="symmetric log scale for the G-effect")
    p = sub.add_parser("panels", help="runs side by side, titled and arranged by the flags that differ "
                                      "(Figures 4/11, 8, 12)")
    p.add_argument("runs", nargs="+", help="run folders with a geffect.jsonl and an args.json")
    p.add_argument("--rows", default=None, help="args.json key whose sorted values make the rows (e.g. layer)")
    p.add_argument("--cols", default=None, help="args.json key whose sorted values make the columns (e.g. c)")
    p.add_argument("-o", "--out", default="geffect-panels.png", help="image file to write (a bare name goes under out/)")
    p.add_argument("--symlog", action="store_true", help="symmetric log scale for the G-effect")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the image")
    p = sub.add_parser("pointwise", help="NPO's weight against each forget sample's PG-effect (Figures 5b, 16, 17)")
    p.add_argument("runs", nargs="+", help="NPO run folders made with --geffect-pointwise")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 15], help="checkpoints (the step of log.jsonl)")
    p.add_argument("--separate", action="store_true", help="one panel per run and step (Figure 17), not joined")
    p.add_argument("-o", "--out", default="geffect-pointwise.png", help="image file to write (a bare name goes under out/)")
    p.add_argument("--symlog", action="store_true", help="symmetric log scales (the PG-effect spans decades)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the image")
    t = sub.add_parser("tokens", help="the forget answers' tokens shaded by their weights (Appendix F.2), as HTML "
                                      "and PNG")
    t.add_argument("runs", nargs="+", help="run folders with a token_weights.jsonl (--log-token-weights)")
    t.add_argument("--rows", type=int, nargs="+", default=[0, 1],
                   help="forget rows to show, by index in the split (default: 0 1)")
    t.add_argument("--epochs", type=int, nargs="+", default=None, help="epochs to show (default: every logged one)")
    t.add_argument("--scale", choices=("run", "shared"), default="run",
                   help="colour scale from 0 to the largest weight shown: per run, or one for all runs")
    t.add_argument("-o", "--out", default="token_weights.html",
                   help="HTML file to write, its PNG beside it (a bare name goes under out/)")
    args = parser.parse_args(argv)
    try:
        if getattr(args, "dpi", 1) < 1:
            raise common.UsageError(f"--dpi must be positive, got {args.dpi}")
        if args.cmd == "plot":
            out = plot(args.runs, args.out, args.symlog)
        elif args.cmd == "tokens":
            out = tokens_page(args.runs, args.out, args.rows, args.epochs, args.scale)
        elif args.cmd == "panels":
            out = panels(args.runs, args.out, args.rows, args.cols, args.symlog, args.dpi)
        else:
            steps = list(dict.fromkeys(args.steps))
            if min(steps) < 1:
                raise common.UsageError(f"--steps are steps of log.jsonl, from 1; got {min(steps)}")
            out = pointwise(args.runs, args.out, steps, args.separate, args.symlog, args.dpi)
    except common.UsageError as e:
        common.die(str(e))
    print(out)
    return out


if __name__ == "__main__":
    main()
