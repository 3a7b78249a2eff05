"""`lowbit generate`: text from a model or a lowbit output, streamed to the terminal as it is produced."""

from __future__ import annotations

import argparse
import logging
import time
from typing import TYPE_CHECKING

from lowbit.cli.common import DTYPES, SEEDS, add_number, parse_device, torch_dtype
from lowbit.errors import LowbitError
from lowbit.schema import Range

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text from a model or lowbit output (KV cache, streamed)")
    g.add_argument("model", help="lowbit output directory, HF folder, .gguf file, or 'smollm2-135m'")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template as a user turn")
    add_number(g, "--max-new-tokens", int, Range(1), default=64, help="tokens to generate at most (default 64)")
    add_number(g, "--temperature", float, Range(0), default=0.0, help="0 = greedy (default); > 0 samples")
    add_number(g, "--top-p", float, Range(0, 1, open_low=True), default=1.0,
               help="nucleus sampling mass when sampling (default 1.0)")
    add_number(g, "--seed", int, SEEDS, default=0, help="sampling seed (default 0)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of unquantized tensors (default: as stored)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--backend", choices=("exact", "fast"), default="fast",
                   help="fast (default): PyTorch's int4/int8 CPU kernels where the grid fits; exact: dequantize per call")
    g.set_defaults(func=run_generate)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """[1, prompt tokens]; with ``chat`` the prompt becomes a user message in the model's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LowbitError("--chat: this model's tokenizer has no chat template; drop --chat to continue raw text")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def run_generate(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise LowbitError('--prompt "" is empty; pass the text to continue, e.g. --prompt "Once upon a time"')
    import torch
    from transformers import TextStreamer

    from lowbit.api import open_model

    device = parse_device(args.device)
    opened = open_model(args.model, torch_dtype(args.dtype) if args.dtype else None, device, backend=args.backend)
    tokenizer = opened.tokenizer
    ids = prompt_ids(tokenizer, args.prompt, args.chat).to(device)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = opened.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling,
        )
    seconds = time.perf_counter() - start
    new_tokens = out.shape[1] - ids.shape[1]
    # on stderr, so stdout holds only the generated text
    log.info("%d tokens in %.2fs (%.1f tokens/s; prompt %d tokens; model loaded in %.2fs)", new_tokens, seconds,
             new_tokens / seconds, ids.shape[1], opened.load_seconds)
    return 0
