"""SAMI (``algorithm: sami``): teach the policy to let its constitution show in its answers, with no preference labels.

One round (policy_trainer.iterative runs ``sami.iterations`` of them):

1. for each of ``prompts_per_iteration`` queries, draw C constitutions from the run's principle set
   (:func:`draw_constitutions`: every principle as its definition or its negative definition, in
   shuffled order, the C sign patterns distinct) and let the CURRENT policy answer under each (the
   constitution is the system message);
2. for each query, the C x C matrix of length-normalised log-likelihoods log π(y_j | x, c_i)
   (:meth:`SAMITrainer.logp_matrix`), and the loss policy_trainer.sami_math.sami_loss, plus
   ``kl_coef`` times a KL estimate to the initial model on the diagonal responses;
3. RMSprop (or AdamW) steps on the LoRA adapter; the next round regenerates with the updated policy.

The reward service does not train SAMI; it measures it: after every round the held-out prompts are
answered under the positive constitution (every definition, in the set's order) and scored under the
set, and the InfoNCE bound log C - loss on the held-out queries (fresh answers, the same
constitutions every round) is the mutual-information estimate of the report.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
import statistics
from typing import Any

import torch

from policy_trainer.iterative import IterativeTrainer, mean_std, round_rows
from policy_trainer.iterative_config import SAMISettings
from policy_trainer.sami_math import mi_lower_bound, sami_loss
from principles.schema import PrincipleSet
from salmon.errors import UserError

log = logging.getLogger(__name__)

HEADER = "Follow these principles in your answer:"

Constitution = tuple[tuple[str, bool], ...]  # (principle name, negated) in the order shown


def draw_constitutions(pset: PrincipleSet, c: int, rng: random.Random) -> list[Constitution]:
    """``c`` constitutions with distinct sign patterns: each principle once, negated or not, in shuffled order.

    Only principles with a ``negative_definition`` can be negated; the others always appear as they are.
    """
    names = [p.name for p in pset.principles]
    flippable = [p.name for p in pset.principles if p.negative_definition]
    if 2 ** len(flippable) < c:
        raise UserError(f"sami.num_constitutions: {c} distinct constitutions need at least {(c - 1).bit_length()} "
                        f"principles with a negative_definition; set {pset.ref} has {len(flippable)}")
    # Sign patterns without replacement; for small sets enumerate them, for large ones draw until distinct.
    if len(flippable) <= 12:
        patterns = rng.sample(list(itertools.product((False, True), repeat=len(flippable))), c)
    else:
        seen: set[tuple[bool, ...]] = set()
        while len(seen) < c:
            seen.add(tuple(rng.random() < 0.5 for _ in flippable))
        patterns = sorted(seen, key=lambda _: rng.random())
    out = []
    for pattern in patterns:
        neg = dict(zip(flippable, pattern, strict=True))
        order = names[:]
        rng.shuffle(order)
        out.append(tuple((n, neg.get(n, False)) for n in order))
    return out


def render_constitution(pset: PrincipleSet, constitution: Constitution) -> str:
    lines = [HEADER]
    for name, negated in constitution:
        p = pset.get(name)
        lines.append(f"- {p.negative_definition if negated else p.definition}")
    return "\n".join(lines)


def positive_constitution(pset: PrincipleSet) -> Constitution:
    return tuple((p.name, False) for p in pset.principles)


def with_system(messages: list[dict[str, str]], system: str) -> list[dict[str, str]]:
    """The constitution as the system message (before the one ``data.system_prompt`` may have set)."""
    rest = [m for m in messages if m["role"] != "system"]
    own = "\n\n".join([system, *(m["content"] for m in messages if m["role"] == "system")])
    return [{"role": "system", "content": own}, *rest]


def query_rng(seed: int, prompt_id: str, salt: str) -> random.Random:
    """A generator fixed by the run seed and the query: the held-out queries get the same constitutions every round."""
    h = hashlib.sha256(f"{seed}:{salt}:{prompt_id}".encode()).hexdigest()[:16]
    return random.Random(int(h, 16))


class SAMITrainer(IterativeTrainer):
    section = "sami"

    def __init__(self, cfg: Any, **kw: Any):
        self.s: SAMISettings = cfg.sami
        # A set that cannot give C distinct constitutions fails here, before the model is loaded.
        draw_constitutions(kw["reward"].timeline.at_step(0), cfg.sami.num_constitutions, random.Random(0))
        super().__init__(cfg, cfg.sami, **kw)

    def setup_model(self) -> None:
        from peft import get_peft_model

        from policy_trainer.methods.trl_args import peft_config

        if not self.cfg.policy.lora.enabled:
            raise UserError("policy.lora.enabled: sami trains a LoRA adapter (the KL reference is the base with "
                            "the adapter off); set it to true")
        self.model = get_peft_model(self.load_base(), peft_config(self.cfg))
        self.model.eval()  # dropout off: the C x C matrix must compare like with like
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise UserError("policy.lora.target_modules: no module of the policy matched; no adapter to train")
        opt = torch.optim.RMSprop if self.s.optimizer == "rmsprop" else torch.optim.AdamW
        self.optimizer = opt(params, lr=self.s.learning_rate)
        self.params = params

    # -- the matrix ----------------------------------------------------------------------------
    def logp_matrix(self, prompts: list[list[int]], responses: list[list[int]], *,
                    reference: bool = False) -> torch.Tensor:
        """``[C, C]``: mean log-prob per response token of response j after prompt i (adapter off if ``reference``)."""
        c = len(prompts)
        pairs = [(prompts[i], responses[j]) for i in range(c) for j in range(c)]
        pad = self.tokenizer.pad_token_id
        length = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), length), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        resp_mask = torch.zeros_like(ids, dtype=torch.bool)
        for k, (p, r) in enumerate(pairs):
            ids[k, :len(p) + len(r)] = torch.tensor(p + r)
            attn[k, :len(p) + len(r)] = 1
            resp_mask[k, len(p):len(p) + len(r)] = True
        ids, attn, resp_mask = ids.to(self.device), attn.to(self.device), resp_mask.to(self.device)
        if reference:
            with self.model.disable_adapter():
                logits = self.model(input_ids=ids, attention_mask=attn).logits
        else:
            logits = self.model(input_ids=ids, attention_mask=attn).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = resp_mask[:, 1:].float()
        per_seq = (logp * mask).sum(1) / mask.sum(1).clamp(min=1)  # length-normalised, as SAMI
        return per_seq.view(c, c)

    # -- data ----------------------------------------------------------------------------------
    def query_data(self, row: dict, rng: random.Random) -> dict[str, Any]:
        """Constitutions for one query and the current policy's answers under each."""
        cons = draw_constitutions(self.pset, self.s.num_constitutions, rng)
        msgs = [with_system(row["prompt"], render_constitution(self.pset, k)) for k in cons]
        answers = self.generate(self.model, msgs, sample=True)
        resp = [a[0][1] or [self.eos_token_ids[0]] for a in answers]  # an empty answer still has its EOS
        return {"prompt_id": row["prompt_id"], "prompts": [self.encode(m) for m in msgs], "responses": resp,
                "constitutions": [[f"{'¬' if n else ''}{name}" for name, n in k] for k in cons],
                "texts": [a[0][0] for a in answers]}

    def run_round(self, r: int) -> dict[str, Any]:
        from tqdm.auto import tqdm

        rows = round_rows(self.train_rows, self.s.prompts_per_iteration, r, self.cfg.training.seed)
        data = [self.query_data(row, query_rng(self.cfg.training.seed, row["prompt_id"], f"train-{r}"))
                for row in tqdm(rows, desc=f"sami round {r}: generate", unit="query", leave=False)]
        losses, kls, mis, by_epoch = [], [], [], []
        steps = 0
        per_epoch = -(-len(data) // self.s.queries_per_step)
        bar = tqdm(total=self.s.epochs * per_epoch, desc=f"sami round {r}: train", unit="step", leave=False)
        for _ in range(self.s.epochs):
            start = len(losses)
            for i in range(0, len(data), self.s.queries_per_step):
                chunk = data[i:i + self.s.queries_per_step]
                self.optimizer.zero_grad(set_to_none=True)
                for q in chunk:
                    m = self.logp_matrix(q["prompts"], q["responses"])
                    loss = sami_loss(m)
                    total = loss
                    if self.s.kl_coef:
                        with torch.no_grad():
                            ref = self.logp_matrix(q["prompts"], q["responses"], reference=True)
                        kl = (m.diagonal() - ref.diagonal()).mean()  # per-token k1 on the policy's own samples
                        total = total + self.s.kl_coef * kl
                        kls.append(float(kl.detach()))
                    (total / len(chunk)).backward()
                    losses.append(float(loss.detach()))
                    mis.append(float(mi_lower_bound(m.detach())))
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.training.max_grad_norm)
                self.optimizer.step()
                steps += 1
                bar.update()
            by_epoch.append(statistics.fmean(losses[start:]))
        bar.close()
        self.model.eval()
        lm, ls = mean_std(losses)
        return {"loss": lm, "loss_std": ls, "train_mi_mean": mean_std(mis)[0], "kl": mean_std(kls)[0],
                "loss_by_epoch": by_epoch, "optimizer_steps": steps, "queries": [q["prompt_id"] for q in data],
                "sample": {"constitutions": data[0]["constitutions"], "responses": data[0]["texts"]}}

    # -- evaluation ----------------------------------------------------------------------------
    def eval_messages(self, row: dict) -> list[dict[str, str]]:
        return with_system(row["prompt"], render_constitution(self.pset, positive_constitution(self.pset)))

    @torch.no_grad()
    def extra_eval(self, r: int) -> dict[str, Any]:
        from tqdm.auto import tqdm

        mis = []
        for row in tqdm(self.heldout_rows, desc=f"sami round {r}: held-out MI", unit="query", leave=False):
            q = self.query_data(row, query_rng(self.cfg.training.seed, row["prompt_id"], "heldout"))
            mis.append(float(mi_lower_bound(self.logp_matrix(q["prompts"], q["responses"]))))
        m, s = mean_std(mis)
        return {"heldout_mi_mean": m, "heldout_mi_std": s, "heldout_mi": mis,
                "mi_upper_limit": math.log(self.s.num_constitutions)}

    def figure_keys(self) -> list[tuple[str, str | None, str]]:
        return [("heldout_mi_mean", "heldout_mi_std", "MI bound log C - L on held-out queries (nats, mean ± std)"),
                ("loss", "loss_std", "SAMI loss on the round's queries")]

    def report(self) -> dict[str, Any]:
        rep = super().report()
        first, last = self.rounds[0], self.rounds[-1]
        rep["summary"].update(heldout_mi_initial=first.get("heldout_mi_mean"), heldout_mi_final=last.get("heldout_mi_mean"))
        return rep

    def after_round(self, r: int, row: dict[str, Any]) -> None:
        self.model.save_pretrained(str(self.out / "adapter"))  # the latest iterate's adapter (a few MB)
