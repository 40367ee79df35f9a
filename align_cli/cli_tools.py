"""The helper commands beside the training stages: argument handling only (the work lives in the
modules each one calls). Registered on ``align_cli.cli``'s app when that module is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from align_cli.cli import (
    ModelOpt,
    RecipeOpt,
    SetOpt,
    _epilog,
    _fail,
    _guarded,
    _option,
    app,
    console,
    data_app,
    err_console,
    reward_app,
)
from align_cli.recipe import load_recipe
from align_cli.stages import STAGES


@reward_app.command(
    "score",
    epilog=_epilog(
        (
            "align reward score -m runs/reward-tiny/final -d examples/data/prefs.jsonl -o scored.jsonl",
            "align reward score --data examples/data/ranked.jsonl | head -3      (the last reward model)",
        )
    ),
)
def reward_score(
    data: Annotated[
        str, typer.Option("--data", "-d", help="JSONL: pairs, rankings, prompt/completion or messages.")
    ],
    model: _option(
        str | None, "--model", "-m", help="Reward model directory; default: the last `align reward` output."
    ) = None,
    out: _option(Path | None, "--out", "-o", help="JSONL file to write; default: stdout.") = None,
    template: _option(
        str | None,
        "--template",
        help="auto, alpaca, chat or plain; default: what the model was trained with.",
    ) = None,
    max_length: _option(
        int | None, "--max-length", help="Token limit; default: what the model was trained with."
    ) = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Records per forward pass.")] = 16,
) -> None:
    """Write every record with its reward(s): `reward`, `reward_chosen`/`reward_rejected`, or `rewards`."""
    if template is not None and template not in ("auto", "alpaca", "chat", "plain"):
        _fail(f"--template {template!r}: choose one of auto, alpaca, chat, plain")

    def score() -> None:
        from align_cli.data.formats import load_records
        from align_cli.data.precheck import SCORE_KINDS, is_local

        if is_local(data):
            load_records(data, "auto", SCORE_KINDS)  # a data error is reported before torch loads
        from align_cli.reward_score import run_score

        run_score(model, data, out, template, max_length, batch_size)

    _guarded(score)


# ----------------------------------------------------------------------------- pipelines and evaluation

_AGAIN_PIPELINE = "run the same command again to continue (finished stages are kept)"
_CODE_WARNING = (
    "is code: align imports it and runs it as Python code with your rights; run only recipes whose code "
    "you trust."
)


@app.command(
    epilog=_epilog(
        (
            "align pipeline --recipe examples/sentiment/pipeline.yaml",
            "align pipeline -r examples/sentiment/pipeline.yaml --set output=runs/sentiment-b",
        )
    )
)
def pipeline(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Pipeline recipe: stages to run in order.")],
    set_: SetOpt = None,
) -> None:
    """Run the stages a pipeline recipe lists (e.g. sft -> reward -> dpo / ppo), chaining outputs.

    Each stage runs in its own directory under `output`; a finished stage is not run again and an
    interrupted one resumes from its last checkpoint. `@name` in a value means that stage's final model.

    A recipe's evaluate.ground_truth (`file.py:function`, used by `align frontier`)"""
    from align_cli.pipeline import load_pipeline, run_pipeline

    _guarded(lambda: run_pipeline(load_pipeline(recipe, set_), console), _AGAIN_PIPELINE)


pipeline.__doc__ += _CODE_WARNING


@app.command(
    epilog=_epilog(("align frontier --recipe examples/sentiment/frontier.yaml      (what `make demo` runs)",))
)
def frontier(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Pipeline recipe with an evaluate section.")],
    set_: SetOpt = None,
) -> None:
    """Run a pipeline, evaluate every method against the reference, write frontier.csv and frontier.png.

    As in the DPO paper's Figure 2 (left): ground-truth reward against KL(policy || reference) for DPO
    over several beta, PPO over several KL coefficients, best-of-N over several N, Preferred-FT and
    the SFT start.

    evaluate.ground_truth (`file.py:function` or `module:function`)"""
    from align_cli.pipeline import load_pipeline, run_frontier

    _guarded(lambda: run_frontier(load_pipeline(recipe, set_), console), _AGAIN_PIPELINE)


frontier.__doc__ += _CODE_WARNING


@app.command(
    "eval",
    epilog=_epilog(
        (
            "align eval -m runs/dpo/final --reference runs/sft/final "
            "--prompts examples/sentiment/data/prompts_eval.jsonl "
            "--ground-truth examples.sentiment.reviews:sentiment --reward-model runs/reward/final",
        )
    ),
)
def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="The policy to evaluate.")],
    reference: Annotated[str, typer.Option("--reference", help="The reference policy (e.g. the SFT model).")],
    prompts: Annotated[str, typer.Option("--prompts", help="Held-out prompt JSONL.")],
    ground_truth: Annotated[
        str | None,
        typer.Option(
            "--ground-truth",
            help="module:function or file.py:function, text -> reward. This " + _CODE_WARNING,
        ),
    ] = None,
    reward_model: Annotated[
        str | None, typer.Option("--reward-model", help="Reward model for scores and win rate.")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Samples per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory for eval.json and eval.jsonl.")
    ] = None,
) -> None:
    """Sample from a policy and its reference: mean reward, RM score, KL(policy || reference), win rate."""
    from align_cli.evaluate import run_eval

    _guarded(
        lambda: run_eval(
            model, reference, prompts, ground_truth, reward_model, n, max_new_tokens, seed, out, console
        )
    )


# ----------------------------------------------------------------------------- sampling from a model


def _flag(kind: Any, *names: str, help: str) -> Any:
    """An option whose default --help shows (sampling settings are worth seeing)."""
    return Annotated[kind, typer.Option(*names, help=help)]


MaxNewTokensOpt = _flag(int, "--max-new-tokens", help="Most tokens to generate per reply.")
TemperatureOpt = _flag(float, "--temperature", "-t", help="Sampling temperature; 0 = greedy.")
TopPOpt = _flag(float, "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this mass.")
TopKOpt = _flag(int, "--top-k", help="Sample among the k most likely tokens; 0 = off.")
SeedOpt = _flag(int, "--seed", help="Sampling seed (same seed and batch size, same output).")
SystemOpt = _flag(str | None, "--system", help="System message put first in every chat prompt.")


@app.command(
    epilog=_epilog(
        (
            "align generate -m runs/sft-tiny/final --prompt 'Write a haiku about rain.'",
            "align generate -m runs/dpo/final --prompts prompts_eval.jsonl -o samples.jsonl --n 4 -t 0.7",
            "align generate -m runs/sft-lora/final --prompts chats.jsonl --system 'Be brief.' -t 0",
            "align generate -m examples/models/tiny --prompt 'Once upon a time' --no-template",
        )
    )
)
def generate(
    model: Annotated[str, typer.Option("--model", "-m", help="Model directory, hub id or LoRA run output.")],
    prompts: _flag(
        str | None,
        "--prompts",
        "-p",
        help="Prompt file: prompt, Alpaca instruction/input, chat messages (last turn the user's), pairs.",
    ) = None,
    prompt: _flag(list[str] | None, "--prompt", help="A prompt on the command line (repeatable).") = None,
    out: _flag(
        Path | None, "--out", "-o", help="JSONL file to write, one row per prompt; default stdout."
    ) = None,
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: TemperatureOpt = 1.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    n: _flag(int, "--n", help="Completions per prompt (a row then has `completions`).") = 1,
    seed: SeedOpt = 0,
    batch_size: _flag(int, "--batch-size", help="Prompts per generate call.") = 8,
    system: SystemOpt = None,
    template: _flag(
        str | None,
        "--template",
        help="auto, alpaca, chat or plain; default: what the model was trained with (its run's recipe), "
        "or chat for a model whose tokenizer has a chat template.",
    ) = None,
    no_template: _flag(bool, "--no-template", help="Feed each prompt as written (no template).") = False,
) -> None:
    """Sample completions for prompts, rendered as the model saw them in training; one JSONL row per prompt.

    Each row has the prompt, its `completion` (or `completions` with --n), `finished` (a stop token
    ended it, not --max-new-tokens) and `tokens` (generated)."""
    from align_cli.generate import GenerateRequest, run_generate
    from align_cli.generation import SamplingParams

    params = SamplingParams(n, max_new_tokens, temperature, top_p, top_k, seed, batch_size)
    request = GenerateRequest(model, prompts, list(prompt or []), params, system, template, no_template)
    _guarded(lambda: run_generate(request, out, err_console))


@app.command(
    epilog=_epilog(
        (
            "align chat -m runs/dpo/final",
            "align chat -m runs/sft-lora/final --system 'You are a helpful assistant.' -t 0.7 --top-p 0.9",
            "align chat -m examples/models/tiny -t 0 --show-prompt      (see what the model is given)",
        )
    )
)
def chat(
    model: Annotated[str, typer.Option("--model", "-m", help="Model directory, hub id or LoRA run output.")],
    system: SystemOpt = None,
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    seed: SeedOpt = 0,
    context: _flag(
        int, "--context", help="Tokens of prompt + reply before old turns are dropped; 0 = the model's."
    ) = 0,
    show_prompt: _flag(
        bool, "--show-prompt", help="Print the full prompt (history in the chat template) before each reply."
    ) = False,
) -> None:
    """Talk to a model: each reply streams as it is generated; the conversation is kept in its chat template.

    Type a message and Enter. /reset clears the conversation, /exit or Ctrl-D quits, /help lists these.
    When the conversation outgrows the model's context, the oldest turns are dropped (with a notice)."""
    from align_cli.chat import run_chat
    from align_cli.generation import SamplingParams

    params = SamplingParams(1, max_new_tokens, temperature, top_p, top_k, seed, 1)
    _guarded(lambda: run_chat(model, params, system, context, show_prompt, err_console))


# ----------------------------------------------------------------------------- planning and export


@app.command(
    epilog=_epilog(
        (
            "align plan --recipe recipes/zephyr-7b/dpo.yaml",
            "align plan -r recipes/llama2-hh/sft.yaml --processes 8 --shard zero3",
            "align plan -r recipes/sft-tiny.yaml --set model.lora.enabled=true",
        )
    )
)
def plan(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Recipe of any training stage.")],
    model: ModelOpt = None,
    set_: SetOpt = None,
    processes: Annotated[int, typer.Option("--processes", help="Processes (GPUs) the run will use.")] = 1,
    shard: Annotated[
        str,
        typer.Option(
            "--shard", help="none (DDP), zero2 (gradients + optimizer), zero3 (also weights; FSDP)."
        ),
    ] = "none",
    device: Annotated[
        str, typer.Option("--device", help="cuda or cpu (CPU attention kernels keep the s x s scores).")
    ] = "cuda",
) -> None:
    """Resolve a recipe and estimate its memory per device, reading only the model's config (no weights).

    Weights, gradients, optimizer state (by optimizer), activations of one micro-batch, frozen models
    (reference, reward model) and the sampling KV cache, so you know before launching whether a run fits."""

    def estimate() -> None:
        load_recipe(recipe, {"model.name_or_path": model}, set_)  # a recipe error before torch loads
        from align_cli.memory import print_plan

        print_plan(recipe, model, set_, processes, shard, device, console)

    _guarded(estimate)


@app.command(
    epilog=_epilog(
        (
            "align export --model runs/sft-lora/final --merge-lora --out models/sft-merged",
            "align export -m runs/dpo/final --out models/dpo-bf16 --dtype bfloat16",
        )
    )
)
def export(
    model: Annotated[str, typer.Option("--model", "-m", help="A run's final model (e.g. RUN/final).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    merge_lora: Annotated[
        bool, typer.Option("--merge-lora", help="Merge a LoRA adapter into its base weights.")
    ] = False,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float32, bfloat16 or float16; default: as saved.")
    ] = None,
) -> None:
    """Write a model as a standalone directory (safetensors + tokenizer) that loads with from_pretrained.

    With --merge-lora a LoRA run's adapter is folded into its base model's weights (W + B A alpha / r):
    the result needs no peft and gives the same outputs as the adapter model."""
    from align_cli.engine.metrics import print_table
    from align_cli.export import export_model

    _guarded(
        lambda: print_table(
            "align export", list(export_model(model, out, merge_lora, dtype).items()), console
        )
    )


# ----------------------------------------------------------------------------- helpers


@app.command(
    "init-model",
    epilog=_epilog(
        (
            "align init-model --preset tiny --out examples/models/tiny",
            "align init-model --preset small --out /tmp/small --seed 1",
            "align init-model --preset tiny --base --out /tmp/tiny-base",
        )
    ),
)
def init_model(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the model and tokenizer to.")],
    preset: Annotated[
        str, typer.Option("--preset", "-p", help="tiny (~1M params) or small (~25M).")
    ] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="Initialisation seed (same seed, same weights).")] = 0,
    corpus: Annotated[
        list[Path] | None,
        typer.Option("--corpus", help="Text/JSONL files to train the tokenizer on (repeatable)."),
    ] = None,
    base: Annotated[
        bool,
        typer.Option(
            "--base",
            help="A base model's tokenizer: no chat template, no chat markers (chat SFT then adds its own).",
        ),
    ] = False,
) -> None:
    """Write a random-init Llama-architecture model with an offline byte-level BPE tokenizer."""
    from align_cli.presets import init_model_command

    _guarded(
        lambda: console.print(
            f"wrote {preset} model to [bold]{init_model_command(preset, out, seed, corpus, base)}[/]"
        )
    )


@data_app.command(
    "check",
    epilog=_epilog(
        (
            "align data check examples/data/alpaca.jsonl --model examples/models/tiny",
            "align data check examples/data/prefs.jsonl --recipe recipes/dpo-tiny.yaml",
            "align data check HuggingFaceH4/ultrafeedback_binarized:train_prefs --stage dpo",
        )
    ),
)
def data_check(
    file: Annotated[
        str, typer.Argument(help="A data file (.jsonl .json .parquet .csv .tsv), folder or hub id.")
    ],
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Override data.max_length.")] = None,
    stage: Annotated[
        str | None,
        typer.Option("--stage", help=f"Check for this stage (default: the recipe's): {', '.join(STAGES)}."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Validate a data file as training reads it; show one record as the model sees it, token-length
    percentiles and what max length would cut."""
    from align_cli.data.check import check_file

    overrides = {"model.name_or_path": model, "data.max_length": max_length}
    _guarded(lambda: check_file(file, load_recipe(recipe, overrides, set_), console, stage))
