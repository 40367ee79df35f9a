"""Sample n responses per prompt from a saved policy and score them with a reward source (a reward model
and/or reward functions), sharded across processes in whole batches (best-of-N rounds; any stage that
samples from a finished policy)."""

from __future__ import annotations

import time

from accelerate import PartialState
from accelerate.utils import gather_object
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from align_cli.data.prompts import Prompt
from align_cli.data.templates import needs_chat, settle_chat_template
from align_cli.generation import Sample, SamplingParams, sample, sample_vllm, shard_batches
from align_cli.models import load_causal_lm, load_tokenizer
from align_cli.recipe import ModelSection, Recipe
from align_cli.rewards import Rewards, RewardSource


def sample_and_score(
    policy_dir: str,
    reward: RewardSource,
    prompts: list[Prompt],
    recipe: Recipe,
    seed: int,
    n: int,
    backend: str,
    console: Console,
) -> tuple[list[Sample], list[str], Rewards]:
    """Sample n responses per prompt from the policy in ``policy_dir`` and score them with ``reward``.

    Under several processes each samples and scores a contiguous share of the prompts in whole batches
    (seeded by global batch index, so the samples do not depend on the number of processes) and every
    process gets all results back, in prompt order. vLLM manages its own GPUs: the main process samples
    everything there."""
    rs, template = recipe.rejection, recipe.data.template
    state = PartialState()
    if backend == "vllm":
        start, stop, first = (0, len(prompts), 0) if state.is_main_process else (0, 0, 0)
    else:
        start, stop, first = shard_batches(
            len(prompts), rs.prompts_per_batch, state.process_index, state.num_processes
        )
    policy_tok = load_tokenizer(ModelSection(name_or_path=policy_dir))
    settle_chat_template(policy_tok, recipe.data.chat_template, needs_chat(template, prompts))
    params = SamplingParams(
        n=n,
        max_new_tokens=rs.max_new_tokens,
        temperature=rs.temperature,
        top_p=rs.top_p,
        top_k=rs.top_k,
        seed=seed,
        prompts_per_batch=rs.prompts_per_batch,
    )
    prompt_ids = [p.ids(template, policy_tok) for p in prompts[start:stop]]
    columns = (
        TextColumn("[bold]sampling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} samples/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    samples: list[Sample] = []
    with Progress(*columns, console=console, disable=not state.is_main_process) as progress:
        task = progress.add_task("sample", total=len(prompt_ids) * n, rate="-")  # this process's share
        started = time.perf_counter()

        def advance(done: int) -> None:
            progress.advance(task, done)
            finished = progress.tasks[0].completed
            progress.update(task, rate=f"{finished / (time.perf_counter() - started):.1f}")

        if backend == "vllm" and prompt_ids:
            samples = sample_vllm(policy_dir, policy_tok, prompt_ids, params)
            advance(len(samples))
        elif prompt_ids:
            section = ModelSection(name_or_path=policy_dir, dtype=recipe.model.dtype)
            policy = load_causal_lm(section, policy_tok)
            policy.to(state.device)
            samples = sample(policy, policy_tok, prompt_ids, params, progress=advance, first_batch=first)
            del policy
    for s in samples:
        s.prompt_index += start
    texts = [policy_tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]
    sampled_prompts, finished = [prompts[s.prompt_index] for s in samples], [s.finished for s in samples]
    rewards = reward(sampled_prompts, texts, finished)
    if state.num_processes > 1:  # every process gets every result, in prompt order (contiguous shares)
        rows = list(zip(samples, texts, rewards.total, (rewards.sample(i) for i in range(len(samples)))))
        gathered = gather_object(rows)
        samples, texts = [g[0] for g in gathered], [g[1] for g in gathered]
        by_source = {name: [g[3][name] for g in gathered] for name in reward.names}
        rewards = Rewards([g[2] for g in gathered], by_source)
    return samples, texts, rewards
