"""python -m trainer.generate MODEL_DIR --prompt TEXT: sample text from an exported model
(final_model/, or its int8 form from python -m trainer.export int8)."""
from __future__ import annotations

import sys

from trainer.cli import Parser, fail
from trainer.errors import CheckpointError
from trainer.export.model_dir import model_dir_problem

PROG = "python -m trainer.generate"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Generate text with a model directory written by the trainer (final_model/).")
    p.add_argument("model_dir", help="A Hugging Face model directory, e.g. runs/my-model/final_model.")
    p.add_argument("--prompt", default="", help="Text to continue.")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token (greedy).")
    p.add_argument("--top-k", type=int, default=50, help="Sample among the k most likely tokens (0: all).")
    p.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling: the smallest set with this mass.")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


def generate(model_dir: str, prompt: str, *, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int = 50, top_p: float = 0.95, num_samples: int = 1, seed: int = 0) -> list[str]:
    import torch

    from trainer.export.inference import load_model_dir

    model, tokenizer = load_model_dir(model_dir)      # fp32 final_model/ or its int8 form
    torch.manual_seed(seed)
    ids = tokenizer(prompt or tokenizer.eos_token, return_tensors="pt").input_ids
    # GPT-2 has learned positions up to its context only, and a Llama was trained on no longer ones:
    # keep the prompt's end and stop at the context (GPT2Config maps the name to n_positions).
    context = model.config.max_position_embeddings
    ids = ids[:, -(context - 1):]
    max_new_tokens = min(max_new_tokens, context - ids.shape[1])
    sampling = temperature > 0
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=sampling,
                         temperature=temperature if sampling else None, top_k=top_k if sampling else None,
                         top_p=top_p if sampling else None, num_return_sequences=num_samples,
                         pad_token_id=tokenizer.eos_token_id, suppress_tokens=padded_ids(model, tokenizer))
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in out]


def padded_ids(model, tokenizer) -> list[int] | None:
    """The ids past the tokenizer's, which pad the model's vocabulary to a multiple of 64
    (trainer.model.padded_vocab): never targets, so never generated. final_model/'s generation
    config lists them too; an int8 directory's model is built from config.json alone."""
    return list(range(len(tokenizer), model.config.vocab_size)) or None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = [m for ok, m in (
        (args.max_new_tokens > 0, f"--max-new-tokens {args.max_new_tokens}: use a positive number"),
        (args.temperature >= 0, f"--temperature {args.temperature}: use 0 (greedy) or a positive value"),
        (args.top_k >= 0, f"--top-k {args.top_k}: use 0 (off) or a positive number"),
        (0 < args.top_p <= 1, f"--top-p {args.top_p}: use a value in (0, 1]"),
        (args.num_samples > 0, f"--num-samples {args.num_samples}: use a positive number"),
    ) if not ok]
    if problem := model_dir_problem(args.model_dir):   # before torch and transformers are imported
        problems.append(problem)
    if problems:
        from trainer.errors import ConfigError
        fail(PROG, ConfigError(problems))
    try:
        texts = generate(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         num_samples=args.num_samples, seed=args.seed)
    except CheckpointError as exc:
        fail(PROG, exc)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i}")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
