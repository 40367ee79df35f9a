"""The stage registry: one entry per training method drives the CLI commands, `align pipeline`,
`align plan` and recipe validation.

Each stage module has the same small face (a shape, not a base class):
    run(recipe, resume=False, console=None) -> summary dict
    memory_plan(recipe, configs, processes) -> memory.MemoryPlan     (what `align plan` estimates)
Its entry here holds what must be known before torch is imported (help, flags, recipe validation):
its name, its recipe section, the common recipe keys it does not read, its extra flags and defaults.
Adding a method: its stage module, its section in ``align_cli/sections.py``, one entry below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from align_cli import sections as S


@dataclass(frozen=True)
class Flag:
    """A command-line option of one stage that sets one recipe key."""

    name: str  # "--prompts"
    key: str  # "ppo.prompts"
    type: type
    help: str


@dataclass(frozen=True)
class Stage:
    name: str  # the command (`align NAME`) and the recipe's `stage:`
    module: str  # align_cli.stages.<module>: run() and memory_plan()
    section: str | None  # its own recipe section (a Recipe attribute), None if it has none
    config: type | None  # that section's dataclass
    help: str  # the command's help: first line, then details
    examples: tuple[str, ...] = ()
    # common keys the stage never reads -> what to use instead; setting one is a recipe error
    unread: dict[str, str] = field(default_factory=dict)
    flags: tuple[Flag, ...] = ()
    resume_variants: bool = True  # --resume-from-previous and --resume-with-changes
    defaults: dict[str, Any] = field(default_factory=dict)  # under the recipe, flags and --set
    # model.load_in_4bit/8bit without LoRA: only a stage that trains nothing quantized may allow it
    quantized_without_lora: bool = False

    def load(self) -> ModuleType:
        return importlib.import_module(f"align_cli.stages.{self.module}")


_PROMPTS = "prompts come from one prompt file"
_BATCH = "on-policy batches are set by ppo.rollout_batch_size and ppo.mini_batch_size"
# the reward of the on-policy stages: what it can be, and that a reward function is code
_REWARD_SOURCES = (
    "\n\nThe reward: a reward model and/or Python reward functions ({stage}.reward_functions: "
    "file.py:function or module:function, TRL's GRPO convention; {stage}.reward_weights). A reward "
    "function is code: align imports it and runs it as Python code with your rights; name only code you "
    "trust."
)
_REWARD_MODEL_HELP = "Reward model (default: the last `align reward` output)."


def _no_eval(name: str) -> dict[str, str]:
    """The keys that compare evaluations: an on-policy stage has no eval set."""
    why = f"{name} has no eval set to pick a best model or stop early by"
    keys = ("save_best", "best_metric", "greater_is_better", "early_stopping_patience")
    return {f"training.{key}": why for key in keys}


def _group_unread(name: str) -> dict[str, str]:
    """The common keys GRPO and RLOO do not read (as PPO: prompts in, on-policy batches)."""
    batch = f"on-policy batches are set by {name}.prompts_per_iteration and {name}.mini_batch_size"
    return {
        "training.epochs": f"{name} runs {name}.iterations (or training.max_steps) iterations",
        "training.micro_batch_size": batch,
        "training.grad_accum": batch,
        "training.eval_every": f"{name} has no eval set; it logs every iteration",
        "training.log_every": f"{name} logs every iteration",
        **_no_eval(name),
        "data.eval": _PROMPTS,
        "data.eval_fraction": _PROMPTS,
        "data.format": _PROMPTS,
        "data.on_too_long": f"a prompt longer than data.max_length - {name}.max_new_tokens is dropped",
        "data.packing": "samples are padded",
        "data.group_by_length": "samples are grouped by length always",
    }


def _group_flags(name: str) -> tuple[Flag, ...]:
    return (
        Flag("--prompts", f"{name}.prompts", str, f"Prompt JSONL ({name}.prompts)."),
        Flag("--reward-model", f"{name}.reward_model", str, _REWARD_MODEL_HELP),
    )


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "sft",
            "sft",
            "sft",
            S.SFTSection,
            "Supervised fine-tuning: loss on response tokens only (Alpaca, prompt/completion, chat, text).",
            (
                "align sft --recipe recipes/sft-tiny.yaml",
                "align sft -m examples/models/tiny -d examples/data/alpaca.jsonl --set training.lr=1e-3 "
                "--max-steps 50",
                "align sft -r recipes/sft-tiny.yaml -o runs/sft-a --resume",
            ),
            unread={"data.max_prompt_length": "SFT cuts a too-long example as a whole (data.on_too_long)"},
        ),
        Stage(
            "reward",
            "reward",
            "reward",
            S.RewardSection,
            "Train a reward model on pairwise, rated or ranked preferences; `align reward score` applies "
            "one.\n\nPairs (prompt/chosen/rejected, or HH-style conversations) with an optional Llama 2 "
            "margin or rating, and rankings (prompt + responses best first, or with scores; all C(K,2) "
            "pairs, one forward pass per response). Defaults as Llama 2: 1 epoch, lr 1e-5, cosine to 10%, "
            "warmup 3% (at least 5 steps).",
            (
                "align reward --recipe recipes/reward-tiny.yaml",
                "align reward -d examples/data/prefs.jsonl      (starts from the last `align sft` output)",
                "align reward -m runs/sft-tiny/final -d examples/data/ranked.jsonl      (K-way rankings)",
                "align reward -r recipes/reward-tiny.yaml --set reward.use_margin=false "
                "--set reward.center_coef=0.01",
                "align reward score -m runs/reward-tiny/final -d examples/data/prefs.jsonl -o scored.jsonl",
            ),
            unread={
                "data.on_too_long": "a pair is cut to fit (prompt start, response end), never dropped",
                "data.packing": "preference batches are padded",
            },
            # Llama 2 reward models: 1 epoch (more overfits), lr 1e-5, cosine to 10%, warmup 3% (>= 5 steps)
            defaults={
                "training": {
                    "epochs": 1.0,
                    "lr": 1e-5,
                    "scheduler": "cosine",
                    "min_lr_ratio": 0.1,
                    "warmup_ratio": 0.03,
                    "warmup_steps": 5,
                }
            },
        ),
        Stage(
            "dpo",
            "dpo",
            "dpo",
            S.DPOSection,
            "Direct Preference Optimization and its family (cDPO, IPO, hinge, SimPO, ORPO, Plackett-Luce).",
            (
                "align dpo --data examples/data/prefs.jsonl      (policy and reference: the last sft output)",
                "align dpo --recipe recipes/dpo-tiny.yaml --set dpo.beta=0.5 --set dpo.loss_type=ipo",
                "align dpo -m runs/sft-tiny/final -d examples/data/ranked.jsonl  (Plackett-Luce rankings)",
                "align dpo -r recipes/dpo-tiny.yaml --set dpo.reference_cache=false      (live reference)",
                "align dpo -m BASE_MODEL -d examples/data/prefs.jsonl --set dpo.loss_type=orpo  (ORPO)",
                "align sft -m MODEL -d examples/data/prefs.jsonl      (Preferred-FT baseline: SFT on chosen)",
            ),
            unread={"data.packing": "preference batches are padded"},
        ),
        Stage(
            "kto",
            "kto",
            "kto",
            S.KTOSection,
            "KTO on unpaired completions labelled desirable or undesirable (prompt, completion, label).",
            (
                "align kto --data examples/data/unpaired.jsonl      (policy and reference: the last sft)",
                "align kto --recipe recipes/kto-tiny.yaml --set kto.undesirable_weight=1.5",
            ),
            unread={"data.packing": "KTO batches are padded"},
        ),
        Stage(
            "rejection-sample",
            "rejection_sampling",
            "rejection",
            S.RejectionSection,
            "Best-of-N (Llama 2 rejection sampling): sample N per prompt, score, keep the best, optionally "
            "SFT.\n\nWrites samples.jsonl (every sample and its reward), best.jsonl (SFT-ready), "
            "pairs.jsonl (best vs worst, ready for `align dpo` / `align reward`) and a table of reward by N "
            "with the analytic KL.\n\nThe reward: a reward model and/or Python reward functions "
            "(rejection.reward_functions: file.py:function or module:function, TRL's GRPO convention; "
            "rejection.reward_weights). A reward function is code: align imports it and runs it as Python "
            "code with your rights; name only code you trust.",
            (
                "align rejection-sample --n 16 --prompts examples/data/prompts.jsonl  (last sft + reward)",
                "align rejection-sample -r recipes/rejection-tiny.yaml --rounds 2 --then sft",
                "align rejection-sample -m runs/sft/final --reward-model runs/reward/final "
                "--prompts examples/data/prompts.jsonl "
                "--set rejection.select=top_k --set rejection.keep=2",
                "align rejection-sample -m runs/sft/final --prompts examples/verifiable/data/train.jsonl "
                "--set 'rejection.reward_functions=[examples/verifiable/rewards.py:right_parity]'",
            ),
            flags=(
                Flag("--n", "rejection.n", int, "Samples per prompt (rejection.n)."),
                Flag("--prompts", "rejection.prompts", str, "Prompt JSONL (rejection.prompts)."),
                Flag("--reward-model", "rejection.reward_model", str, _REWARD_MODEL_HELP),
                Flag("--rounds", "rejection.rounds", int, "Sample/select rounds."),
                Flag(
                    "--then",
                    "rejection.then",
                    str,
                    "'sft': fine-tune on the selected samples after each round.",
                ),
            ),
            resume_variants=False,
            quantized_without_lora=True,
        ),
        Stage(
            "ppo",
            "ppo",
            "ppo",
            S.PPOSection,
            "RLHF with PPO (InstructGPT): per-token KL penalty to the SFT model, value model, GAE, PPO-ptx."
            "\n\n--max-steps counts PPO iterations (rollout + updates). Metrics per iteration in "
            "metrics.csv; a few generations per iteration in samples.jsonl.",
            (
                "align ppo --prompts examples/data/prompts.jsonl      (last sft and reward)",
                "align ppo -r recipes/ppo-tiny.yaml --set ppo.kl_coef=0.2 --set ppo.adaptive_kl=true",
                "align ppo -r recipes/ppo-tiny.yaml --set ppo.ptx_data=examples/data/alpaca.jsonl "
                "--set ppo.ptx_coef=1.0",
            ),
            unread={
                "training.epochs": "PPO runs ppo.iterations (or training.max_steps) iterations",
                "training.micro_batch_size": _BATCH,
                "training.grad_accum": _BATCH,
                "training.eval_every": "PPO has no eval set; it logs every iteration",
                "training.log_every": "PPO logs every iteration",
                **_no_eval("PPO"),
                "data.eval": _PROMPTS,
                "data.eval_fraction": _PROMPTS,
                "data.format": _PROMPTS,
                "data.on_too_long": "a prompt is cut to data.max_length - ppo.max_new_tokens",
                "data.packing": "rollouts are padded",
                "data.group_by_length": "rollouts are grouped by length always",
            },
            flags=(
                Flag("--prompts", "ppo.prompts", str, "Prompt JSONL (ppo.prompts)."),
                Flag("--reward-model", "ppo.reward_model", str, _REWARD_MODEL_HELP),
            ),
        ),
        Stage(
            "grpo",
            "grpo",
            "grpo",
            S.GRPOSection,
            "GRPO (DeepSeekMath): G samples per prompt, advantages against the group, clipped loss with a "
            "k3 KL penalty; no value model.\n\n--max-steps counts iterations (sample + updates). "
            "grpo.scale_rewards: false is Dr. GRPO; grpo.loss_type picks the token normalisation (grpo, "
            "bnpo, dapo, dr_grpo); grpo.beta: 0 loads no reference model. Metrics per iteration in "
            "metrics.csv; a few samples per iteration in samples.jsonl."
            + _REWARD_SOURCES.format(stage="grpo"),
            (
                "align grpo --prompts examples/data/prompts.jsonl      (last sft and reward)",
                "align grpo -r recipes/grpo-tiny.yaml --set grpo.num_generations=8 --set grpo.beta=0",
                "align grpo -r recipes/grpo-tiny.yaml --set grpo.scale_rewards=false "
                "--set grpo.loss_type=dr_grpo      (Dr. GRPO)",
            ),
            unread=_group_unread("grpo"),
            flags=_group_flags("grpo"),
        ),
        Stage(
            "rloo",
            "rloo",
            "rloo",
            S.RLOOSection,
            "RLOO (Ahmadian et al.): k samples per prompt, REINFORCE with the leave-one-out baseline, the KL "
            "penalty in the reward; no value model.\n\n--max-steps counts iterations (sample + updates). "
            "rloo.normalize: reinforce_pp whitens the advantages over the whole batch (REINFORCE++); "
            "rloo.beta: 0 loads no reference model." + _REWARD_SOURCES.format(stage="rloo"),
            (
                "align rloo --prompts examples/data/prompts.jsonl      (last sft and reward)",
                "align rloo -r recipes/rloo-tiny.yaml --set rloo.k=4 --set rloo.normalize=reinforce_pp",
            ),
            unread=_group_unread("rloo"),
            flags=_group_flags("rloo"),
        ),
        Stage(
            "online-dpo",
            "online_dpo",
            "online_dpo",
            S.OnlineDPOSection,
            "Online DPO: each iteration samples n responses per prompt from the current policy, pairs the "
            "best against the worst by the reward, and takes DPO steps on them.\n\n--max-steps counts "
            "iterations (sample + updates). pi_ref is the starting policy (under LoRA: adapters off); "
            "online_dpo.loss_type sigmoid, ipo or hinge as in `align dpo`. Metrics per iteration in "
            "metrics.csv (pairs made, prompts skipped for tied rewards); a few pairs per iteration in "
            "samples.jsonl. The offline loop is rejection-sample -> pairs.jsonl -> dpo "
            "(examples/sentiment/offline-dpo.yaml).",
            (
                "align online-dpo --prompts examples/data/prompts.jsonl      (last sft and reward)",
                "align online-dpo -r recipes/online-dpo-tiny.yaml --set online_dpo.num_generations=8",
            ),
            unread={
                **_group_unread("online_dpo"),
                "training.micro_batch_size": "pairs per optimizer step are online_dpo.mini_batch_size",
                "training.grad_accum": "pairs per optimizer step are online_dpo.mini_batch_size",
            },
            flags=_group_flags("online_dpo"),
        ),
    )
}


def stage_of(name: str) -> Stage:
    """The registered stage ``name``; KeyError names the known ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r} (known: {', '.join(STAGES)})") from None


def section_names() -> dict[str, type]:
    """{section name: dataclass} of every stage's own section."""
    return {s.section: s.config for s in STAGES.values() if s.section and s.config}
