"""PPO with a value model, on the same parts as the GRPO path (``algorithm: ppo``).

TRL's PPOTrainer is gone (``trl.experimental.ppo`` up to 1.10) and it needed an in-process reward
module sharing the policy's tokenizer; ours gets rewards from the service over HTTP through the
SAME reward callables as GRPO (policy_trainer.rewards: principle selection and schedule, shaping,
rollout export, reward-latency timing), and reports through the same StepTimer / report.

Model layout (as SALMON, to fit one GPU): one base model, two LoRA adapters on it, ``policy`` and
``value``, plus a scalar value head (an ``nn.Linear`` on the last hidden state). The reference for
the KL penalty is the base with adapters disabled (no copy). PEFT freezes inactive adapters when
switching; we re-enable them so both adapters train from one optimizer.

One step (``global_step`` s -> s+1):
1. rollout: prompts for step s (a seeded pure function of s, so resume needs no sampler state),
   HF ``generate`` under the policy adapter;
2. rewards: the service score (+ shaping) from ServiceReward/ShapingReward, as GRPO gets them;
3. old logprobs (policy), reference logprobs (adapters off), values (value adapter + head);
   per-token rewards = -kl_coef * k1 + score on the last token; GAE; whitened advantages;
4. ``ppo_epochs`` passes in ``num_minibatches`` shuffled minibatches (micro-batches of
   ``per_device_train_batch_size``), clipped policy + clipped value losses, gradient clipping.

The maths is in policy_trainer.ppo_math. Dropout stays off throughout (eval mode): with LoRA
dropout on during the update the first epoch's ratio would not start at 1, and the clip would
bite on noise rather than on policy change.

Limits of this version: one process (no DDP/DeepSpeed) and HF generate only (TRL's vLLM
integration is wired into its own trainers, not reusable for a second adapter).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import resource
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from policy_trainer import ppo_math as pm
from policy_trainer.config import LoraSettings, RunConfig
from policy_trainer.rewards import ServiceReward, ShapingReward
from salmon.atomic import fsync_dir
from salmon.errors import UserError

log = logging.getLogger(__name__)

ADAPTERS = ("policy", "value")
VALUE_HEAD_FILE = "value_head.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class PPOState:
    """What TrainerCallbacks (StepTimer, _SalmonState) read from a trainer state."""

    global_step: int = 0
    max_steps: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    is_world_process_zero: bool = True


@dataclass
class Rollout:
    """One generation batch, everything ``[B, ...]``; response tensors are ``[B, T]`` right-padded."""

    query: torch.Tensor          # [B, P] left-padded prompt ids
    query_mask: torch.Tensor     # [B, P]
    response: torch.Tensor       # [B, T]
    mask: torch.Tensor           # [B, T] 1 up to and including EOS
    scores: torch.Tensor         # [B] service score (+ shaping)
    old_logprobs: torch.Tensor   # [B, T]
    ref_logprobs: torch.Tensor   # [B, T]
    values: torch.Tensor         # [B, T]
    entropy: torch.Tensor        # [B, T] of the sampling policy
    advantages: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    returns: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def _lora_config(lc: LoraSettings, **override: Any):
    from peft import LoraConfig

    kw = {"r": lc.r, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout, "target_modules": lc.target_modules}
    kw.update({k: v for k, v in override.items() if v is not None})
    return LoraConfig(task_type="CAUSAL_LM", **kw)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PPOTrainer:
    """The PPO loop. Exposes what ``run_training`` uses of a TRL trainer: ``state``, ``accelerator``,
    ``processing_class``, ``eos_token_ids``, ``async_loop``, ``train(resume_from_checkpoint)``."""

    def __init__(self, cfg: RunConfig, *, model_dir: Path, train_dataset: Any, reward: ServiceReward,
                 shaping: ShapingReward | None = None, callbacks: list[Any] | None = None):
        from accelerate import Accelerator
        from peft import get_peft_model
        from transformers import set_seed

        from salmon.modeling import ModelOptions, load_causal_lm, load_tokenizer, pick_device_and_precision

        t, p = cfg.training, cfg.ppo
        if not cfg.policy.lora.enabled:
            raise UserError("policy.lora.enabled: ppo trains LoRA adapters (policy and value on one base); "
                           "set it to true")
        if cfg.generation.use_vllm:
            raise UserError("generation.use_vllm: ppo generates with HF generate (TRL's vLLM path is wired "
                           "into its own trainers); set it to false or use algorithm: grpo")
        if cfg.distributed.deepspeed:
            raise UserError("distributed.deepspeed: ppo runs in one process in this version")
        self.batch_size = t.per_device_train_batch_size * t.gradient_accumulation_steps
        if self.batch_size % p.num_minibatches:
            raise UserError(f"ppo.num_minibatches: {p.num_minibatches} does not divide the rollout batch "
                           f"(per_device_train_batch_size * gradient_accumulation_steps = {self.batch_size})")
        self.cfg, self.reward, self.shaping = cfg, reward, shaping
        self.callbacks = list(callbacks or [])
        self.rows = train_dataset.to_list() if hasattr(train_dataset, "to_list") else list(train_dataset)
        self.out = Path(cfg.output.output_dir)
        self.args = SimpleNamespace(output_dir=str(self.out))
        self.state = PPOState(max_steps=t.max_steps)

        use_cpu = cfg.distributed.use_cpu
        placed, prec = pick_device_and_precision("cpu" if use_cpu else "auto", t.precision)
        # accelerate keeps one process-wide state and refuses another precision once it is set; a
        # process that trained something else first (an SFT or RM training of an orchestrator, in bf16)
        # would make PPO fail, and PPO runs in one process only, so it starts from a fresh state.
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:
            AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(cpu=placed.type == "cpu" if use_cpu is None else use_cpu,
                                       mixed_precision={"fp32": "no"}.get(prec, prec))
        if self.accelerator.num_processes > 1:
            raise UserError("ppo runs in one process in this version; launch it without accelerate/torchrun")
        device = self.accelerator.device

        set_seed(t.seed)  # LoRA A matrices and the data order depend on it
        self.tokenizer = load_tokenizer(model_dir)
        self.processing_class = self.tokenizer
        base = load_causal_lm(model_dir, ModelOptions(dtype=cfg.policy.dtype, attention=cfg.policy.attention,
                                                      device=str(device)))
        gen_eos = base.generation_config.eos_token_id if base.generation_config is not None else None
        eos = [self.tokenizer.eos_token_id]
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_token_ids = [int(e) for e in dict.fromkeys(eos) if e is not None]

        value_cfg, init = self._value_lora_and_init(model_dir)
        self.model = get_peft_model(base, _lora_config(cfg.policy.lora), adapter_name="policy")
        self.model.add_adapter("value", value_cfg)
        if cfg.policy.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.model.eval()  # dropout off for good: see the module docstring
        hidden = base.config.get_text_config().hidden_size
        # Zero head: every value starts at 0, a neutral baseline, instead of random noise in the advantages.
        self.value_head = nn.Linear(hidden, 1).to(device=device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        if init is not None:
            self._apply_value_init(*init)
        self.decoder = self.model.get_base_model().get_decoder()

        self.policy_params = [q for n, q in self.model.named_parameters() if ".policy." in n and "lora_" in n]
        self.value_params = [q for n, q in self.model.named_parameters() if ".value." in n and "lora_" in n]
        self.value_params += list(self.value_head.parameters())
        self.trainable = self.policy_params + self.value_params
        if not self.policy_params or len(self.value_params) <= 2:
            raise UserError("policy.lora.target_modules: no module of the policy matched; no adapter to train")
        opt = torch.optim.AdamW([
            {"params": self.policy_params, "lr": t.learning_rate},
            {"params": self.value_params, "lr": p.value_learning_rate or t.learning_rate}], eps=1e-5)
        warmup = t.warmup_steps

        def schedule(update: int) -> float:  # linear warmup over optimizer updates, then constant
            return min(1.0, (update + 1) / warmup) if warmup else 1.0

        self.optimizer = self.accelerator.prepare(opt)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        self.shuffle = torch.Generator().manual_seed(t.seed)
        self.kl_ctl = pm.AdaptiveKLController(p.kl_coef, p.adaptive_kl.target, p.adaptive_kl.horizon)
        self.async_loop = asyncio.new_event_loop()
        threading.Thread(target=self.async_loop.run_forever, name="ppo-reward-loop", daemon=True).start()
        self.tb_writer: Any = None

    # -- model pieces ---------------------------------------------------------------------------
    def _use(self, adapter: str) -> None:
        """Activate an adapter for the forward pass while keeping BOTH trainable (PEFT freezes the other)."""
        self.model.set_adapter(adapter)
        for q in self.trainable:
            q.requires_grad_(True)

    def _value_lora_and_init(self, model_dir: Path) -> tuple[Any, tuple[dict, dict, Any] | None]:
        """The value adapter's LoraConfig, and (lora weights, head weights, manifest) from a registry
        version when ``ppo.value_init.registry`` is set (its rank and targets then win)."""
        p, lc = self.cfg.ppo, self.cfg.policy.lora
        vi = p.value_init
        fresh = _lora_config(lc, r=p.value_lora.r, lora_alpha=p.value_lora.alpha, lora_dropout=p.value_lora.dropout,
                             target_modules=p.value_lora.target_modules)
        if not vi.registry:
            return fresh, None
        from peft import LoraConfig
        from safetensors.torch import load_file

        from rm_core.registry import Registry, RegistryError
        from salmon.modeling import ModelSourceError, resolve_model_dir

        reg = Registry(vi.registry)
        try:
            version = vi.version or reg.current()
            if not version:
                raise RegistryError(f"registry {reg.root} has no CURRENT version")
            manifest = reg.manifest(version, verify=True)
            base = resolve_model_dir(manifest.base_model)
        except (RegistryError, ModelSourceError) as e:
            raise UserError(f"ppo.value_init: {e}") from None
        if base.resolve() != Path(model_dir).resolve():
            raise UserError(f"ppo.value_init: {version} was trained on {manifest.base_model!r}, not on the policy "
                           f"{self.cfg.policy.model!r}; the value adapter must fit the policy's base")
        if not manifest.adapter:
            raise UserError(f"ppo.value_init: {version} has no adapter to initialise from")
        adir = reg.path(version) / manifest.adapter
        saved = LoraConfig.from_pretrained(str(adir))
        weights = load_file(str(adir / "adapter_model.safetensors"))
        head = {k: v for k, v in weights.items() if "lora_" not in k and ".score." in k}
        lora = {k: v for k, v in weights.items() if "lora_" in k}
        cfg = _lora_config(lc, r=saved.r, lora_alpha=saved.lora_alpha, lora_dropout=saved.lora_dropout,
                           target_modules=sorted(saved.target_modules) if isinstance(saved.target_modules, set)
                           else saved.target_modules)
        return cfg, (lora, head, manifest)

    @torch.no_grad()
    def _apply_value_init(self, lora: dict, head: dict, manifest: Any) -> None:
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(self.model, lora, adapter_name="value")
        unexpected = [k for k in res.unexpected_keys if "lora_" in k]
        if unexpected:
            raise UserError(f"ppo.value_init: {manifest.version} does not fit the policy ({unexpected[0]} ...)")
        w = next((v for k, v in head.items() if k.endswith("weight")), None)
        if w is None or w.shape[-1] != self.value_head.in_features:
            raise UserError(f"ppo.value_init: {manifest.version} has no scalar head of size "
                           f"{self.value_head.in_features}")
        # The service returns (raw - mean) / std * rm_scale; fold that into the head so the initial
        # values speak the reward's units.
        std = manifest.reward_std if manifest.reward_std > 1e-8 else 1.0
        k = self.cfg.shaping.rm_scale / std
        self.value_head.weight.copy_(w.reshape(1, -1).float() * k)
        self.value_head.bias.fill_(-manifest.reward_mean * k)
        log.warning("value adapter and head initialised from reward model %s", manifest.version)

    def _inputs(self, ro: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        q, qm = ro.query[rows], ro.query_mask[rows]
        ids = torch.cat([q, ro.response[rows]], dim=1)
        attn = torch.cat([qm, ro.mask[rows].to(qm.dtype)], dim=1)
        # Left padding: positions count real tokens only, as generate() numbered them.
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        return ids, attn, pos, q.shape[1]

    def _policy_logits(self, ro: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, T, V]`` (temperature-scaled, as sampled) predicting each response token."""
        ids, attn, pos, _ = self._inputs(ro, rows)
        t_len = ro.response.shape[1]
        with self.accelerator.autocast():
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                             logits_to_keep=t_len + 1)
        return out.logits[:, :-1].float() / self.cfg.training.temperature

    def _values(self, ro: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """V(state before response token t), ``[b, T]``: the head on the decoder's last hidden state
        (the decoder alone: no vocabulary projection is computed for the value pass)."""
        ids, attn, pos, p_len = self._inputs(ro, rows)
        with self.accelerator.autocast():
            h = self.decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False).last_hidden_state
        return self.value_head(h[:, p_len - 1:-1].float()).squeeze(-1)

    # -- one step -------------------------------------------------------------------------------
    def prompt_rows(self, step: int) -> list[int]:
        """Dataset rows for ``step``: a seeded permutation per pass over the prompts."""
        per_step = self.batch_size // self.cfg.training.num_generations
        n, out = len(self.rows), []
        for j in range(step * per_step, (step + 1) * per_step):
            epoch, pos = divmod(j, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.training.seed + epoch))
            out.append(int(perm[pos]))
        return out

    def _encode_prompts(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                 for r in rows]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        return enc["input_ids"].to(self.accelerator.device), enc["attention_mask"].to(self.accelerator.device)

    def _response_mask(self, response: torch.Tensor) -> torch.Tensor:
        """1 up to and including the first EOS (TRL cuts completions the same way), 0 after."""
        is_eos = torch.isin(response, torch.tensor(self.eos_token_ids, device=response.device))
        after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
        return (~after).long()

    @torch.no_grad()
    def rollout(self, step: int, metrics: dict[str, float]) -> Rollout:
        t = self.cfg.training
        rows = [self.rows[i] for i in self.prompt_rows(step) for _ in range(t.num_generations)]
        query, query_mask = self._encode_prompts(rows)
        self._use("policy")
        with self.accelerator.autocast():
            seqs = self.model.generate(
                input_ids=query, attention_mask=query_mask, do_sample=True, temperature=t.temperature,
                top_p=t.top_p, top_k=0, max_new_tokens=t.max_completion_length,
                eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id)
        response = seqs[:, query.shape[1]:]
        mask = self._response_mask(response)
        response = torch.where(mask.bool(), response, torch.full_like(response, self.tokenizer.pad_token_id))
        lengths = mask.sum(1).tolist()
        completion_ids = [response[i, :n].tolist() for i, n in enumerate(lengths)]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)

        # The same reward callables (and so the same request path, selection, shaping and export)
        # that TRL calls for GRPO; TRL hands conversational completions as message lists.
        kwargs = dict(prompts=[r["prompt"] for r in rows], completions=[[{"role": "assistant", "content": x}]
                                                                          for x in texts],
                      completion_ids=completion_ids, prompt_id=[r.get("prompt_id") for r in rows],
                      prompt_type=[r.get("prompt_type") for r in rows])

        def log_metric(name: str, value: float) -> None:
            metrics[name] = float(value)

        rm = asyncio.run_coroutine_threadsafe(
            self.reward(**kwargs, trainer_state=self.state, log_metric=log_metric), self.async_loop).result()
        shaped = self.shaping(**kwargs) if self.shaping is not None else [0.0] * len(rows)
        scores = torch.tensor([a + b for a, b in zip(rm, shaped, strict=True)], dtype=torch.float32,
                              device=query.device)
        metrics["rewards/salmon_rm/mean"] = float(sum(rm) / len(rm))
        if self.shaping is not None:
            metrics["rewards/shaping/mean"] = float(sum(shaped) / len(shaped))

        ro = Rollout(query, query_mask, response, mask, scores, *(torch.empty(0),) * 4)
        olp, rlp, vals, ent = [], [], [], []
        for rows_idx in torch.arange(len(rows)).split(t.per_device_train_batch_size):
            logits = self._policy_logits(ro, rows_idx)
            olp.append(pm.logprobs_from_logits(logits, response[rows_idx]))
            ent.append(pm.entropy_from_logits(logits))
            with self.model.disable_adapter():  # the reference: the base model itself
                rlp.append(pm.logprobs_from_logits(self._policy_logits(ro, rows_idx), response[rows_idx]))
            self._use("value")
            vals.append(self._values(ro, rows_idx))
            self._use("policy")
        ro.old_logprobs, ro.ref_logprobs = torch.cat(olp), torch.cat(rlp)
        ro.values, ro.entropy = torch.cat(vals), torch.cat(ent)
        return ro

    def advantages(self, ro: Rollout, metrics: dict[str, float]) -> None:
        p = self.cfg.ppo
        kl = pm.kl_k1(ro.old_logprobs, ro.ref_logprobs, ro.mask, clamp_min=0.0 if p.clamp_kl else None)
        raw_kl = pm.kl_k1(ro.old_logprobs, ro.ref_logprobs, ro.mask)
        kl_coef = self.kl_ctl.value
        rewards = pm.token_rewards(ro.scores, kl, ro.mask, kl_coef)
        if p.whiten_rewards:
            rewards = pm.masked_whiten(rewards, ro.mask, shift_mean=False)
        adv, ro.returns = pm.gae(rewards, ro.values, ro.mask, p.gamma, p.lam)
        ro.advantages = pm.masked_whiten(adv, ro.mask)
        seq_kl = raw_kl.sum(1)
        non_score = (-kl_coef * kl).sum(1)
        lengths = ro.mask.sum(1).float()
        finished = torch.isin(ro.response.gather(1, (lengths.long() - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                              torch.tensor(self.eos_token_ids, device=ro.response.device))
        metrics.update({
            "reward": float(ro.scores.mean()), "reward_std": float(ro.scores.std()) if len(ro.scores) > 1 else 0.0,
            "kl": float(pm.masked_mean(raw_kl, ro.mask)), "objective/kl": float(seq_kl.mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((ro.scores + non_score).mean()),
            "entropy": float(pm.masked_mean(ro.entropy, ro.mask)), "kl_coef": kl_coef,
            "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float((~finished).float().mean()),
            "val/mean": float(pm.masked_mean(ro.values, ro.mask)),
            "val/explained_variance": pm.explained_variance(ro.values, ro.returns, ro.mask),
        })
        if p.adaptive_kl.enabled:
            self.kl_ctl.update(float(seq_kl.mean()), len(ro.scores))

    def update(self, ro: Rollout, metrics: dict[str, float]) -> None:
        t, p = self.cfg.training, self.cfg.ppo
        b = len(ro.scores)
        mb_size = b // p.num_minibatches
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clip", "vclip", "approxkl", "ratio", "gnorm")}
        for _ in range(p.ppo_epochs):
            perm = torch.randperm(b, generator=self.shuffle)
            for mb in perm.split(mb_size):
                self.optimizer.zero_grad(set_to_none=True)
                for micro in mb.split(t.per_device_train_batch_size):
                    # Two backward passes (policy, then value) instead of one summed loss: the
                    # adapters are disjoint, so the gradients are the same, and only one graph is
                    # alive at a time.
                    w = len(micro) / len(mb)
                    mask = ro.mask[micro]
                    self._use("policy")
                    logp = pm.logprobs_from_logits(self._policy_logits(ro, micro), ro.response[micro])
                    pg, st = pm.policy_loss(logp, ro.old_logprobs[micro], ro.advantages[micro], mask, p.cliprange)
                    self.accelerator.backward(pg * w)
                    self._use("value")
                    vl, vst = pm.value_loss(self._values(ro, micro), ro.values[micro], ro.returns[micro], mask,
                                            p.cliprange_value)
                    self.accelerator.backward(p.vf_coef * vl * w)
                    stats["pg"].append(float(pg.detach()))
                    stats["vf"].append(float(vl.detach()))
                    stats["clip"].append(float(st["clipfrac"]))
                    stats["approxkl"].append(float(st["approxkl"]))
                    stats["ratio"].append(float(st["ratio"]))
                    stats["vclip"].append(float(vst["clipfrac"]))
                gnorm = self.accelerator.clip_grad_norm_(self.trainable, t.max_grad_norm)
                stats["gnorm"].append(float(gnorm))
                self.optimizer.step()
                self.scheduler.step()
        self._use("policy")

        def avg(k: str) -> float:
            return sum(stats[k]) / len(stats[k])

        metrics.update({
            "loss": avg("pg") + p.vf_coef * avg("vf"), "loss/policy_avg": avg("pg"), "loss/value_avg": avg("vf"),
            "policy/clipfrac_avg": avg("clip"), "policy/approxkl_avg": avg("approxkl"),
            "policy/ratio_avg": avg("ratio"), "val/clipfrac_avg": avg("vclip"), "grad_norm": avg("gnorm"),
            "learning_rate": self.scheduler.get_last_lr()[0], "memory/peak_rss_mb": peak_rss_mb(),
        })
        if torch.cuda.is_available() and self.accelerator.device.type == "cuda":
            metrics["memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20

    # -- the loop -------------------------------------------------------------------------------
    def _callbacks(self, event: str) -> SimpleNamespace:
        control = SimpleNamespace(should_save=False)
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self.args, self.state, control)
        return control

    def train(self, resume_from_checkpoint: str | None = None) -> PPOState:
        o = self.cfg.output
        if resume_from_checkpoint:
            self.load_checkpoint(Path(resume_from_checkpoint))
        if o.tensorboard and self.tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(str(self.out / "runs" / "ppo"))
            for cb in self.callbacks:  # StepTimer writes its step-time scalars into the same file
                if hasattr(cb, "tb_callback"):
                    cb.tb_callback = SimpleNamespace(tb_writer=self.tb_writer)
        try:
            while self.state.global_step < self.state.max_steps:
                step = self.state.global_step
                self._callbacks("on_step_begin")
                metrics: dict[str, float] = {}
                ro = self.rollout(step, metrics)
                self.advantages(ro, metrics)
                self.update(ro, metrics)
                self.state.global_step = step + 1
                entry = {**{k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))},
                         "step": self.state.global_step}
                self.state.log_history.append(entry)
                control = self._callbacks("on_step_end")
                if self.tb_writer is not None and self.state.global_step % o.logging_steps == 0:
                    for k, v in entry.items():
                        if k != "step":
                            self.tb_writer.add_scalar(f"train/{k}", v, self.state.global_step)
                    self.tb_writer.flush()
                log.info("ppo step %d: reward %.4f kl %.4f value loss %.4f clipfrac %.3f",
                         step, metrics["reward"], metrics["kl"], metrics["loss/value_avg"],
                         metrics["policy/clipfrac_avg"])
                if control.should_save or self.state.global_step % o.save_steps == 0:
                    self.save_checkpoint()
        finally:
            if self.tb_writer is not None:
                self.tb_writer.flush()
        return self.state

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoint-N/: policy/ and value/ (PEFT adapters), value_head.safetensors, optimizer,
        scheduler, RNG, trainer_state.json. Built in a hidden directory and renamed into place, so a
        checkpoint-N that exists is complete (resume picks the newest one)."""
        from safetensors.torch import save_file

        step = self.state.global_step
        final = self.out / f"checkpoint-{step}"
        tmp = self.out / f".checkpoint-{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(str(tmp), safe_serialization=True)  # -> tmp/policy, tmp/value
        save_file({k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()},
                  str(tmp / VALUE_HEAD_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "shuffle": self.shuffle.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng_state.pt")
        (tmp / STATE_FILE).write_text(json.dumps({
            "global_step": step, "max_steps": self.state.max_steps, "algorithm": "ppo",
            "kl_coef": self.kl_ctl.value, "log_history": self.state.log_history}, indent=1))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # the same step saved again (abort right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.out)
        self._callbacks("on_save")
        self._rotate()
        return final

    def _save_checkpoint(self, model: Any = None, trial: Any = None) -> None:
        """The name run_training calls on a TRL trainer when the service stays away."""
        self.save_checkpoint()

    def _rotate(self) -> None:
        limit = self.cfg.output.save_total_limit
        if not limit:
            return
        ckpts = sorted((int(p.name.split("-")[1]), p) for p in self.out.glob("checkpoint-*")
                       if p.is_dir() and p.name.split("-")[1].isdigit())
        for _, p in ckpts[:-limit]:
            shutil.rmtree(p, ignore_errors=True)

    def load_checkpoint(self, ckpt: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        for name in ADAPTERS:
            res = set_peft_model_state_dict(self.model, load_file(str(ckpt / name / "adapter_model.safetensors")),
                                            adapter_name=name)
            if any("lora_" in k for k in res.unexpected_keys):
                raise UserError(f"{ckpt}: the {name} adapter does not fit this config (policy.lora / ppo.value_lora)")
        self.value_head.load_state_dict(load_file(str(ckpt / VALUE_HEAD_FILE)))
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=self.accelerator.device)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        rng = torch.load(ckpt / "rng_state.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        self.shuffle.set_state(rng["shuffle"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        st = json.loads((ckpt / STATE_FILE).read_text())
        self.state.global_step = int(st["global_step"])
        self.state.log_history = list(st.get("log_history", []))
        self.kl_ctl.value = float(st.get("kl_coef", self.kl_ctl.value))
