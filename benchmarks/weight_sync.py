"""Weight sync figures: bytes on the wire, push and swap time, and output drift, per encoding.

    python -m benchmarks.weight_sync                          # TinyStories-656K and a ~25M random Llama
    python -m benchmarks.weight_sync --models tinystories --rounds 3

For each model, a real server runs in this process on 127.0.0.1 and receives pushes over gRPC:
full weights (every parameter, perturbed from the checkpoint so the update is a real change) and
LoRA-only (rank-r adapters on every attention and MLP projection), each as float32, bfloat16, int8
and int4 (blockwise, per-block scales). Drift compares the weights the server received (decoded from
the wire; the test suite shows the server's greedy outputs equal HF generate of exactly these) with
the unquantized update: max |Δlogit| over teacher-forced sequences (real text for a pretrained model,
random ids for a random one), top-1 agreement there, and the share of the server's greedy completions
identical to those after the float32 push.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch

from clients.weight_push import push_weights
from common.files import write_private
from protos.codec import ENCODINGS, roundtrip
from serving.engine.config import EngineConfig
from serving.models.random_init import LLAMA_25M, save_random_checkpoint

TOKEN = "benchmark-token"
TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "tinystories-656k"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def full_update(hf, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + 0.05 * p.detach().std() * torch.randn(p.shape, generator=g))
            for n, p in hf.named_parameters()]


def lora_update(hf, rank: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            out_dim, in_dim = module.weight.shape
            std = module.weight.detach().std().item()
            out.append((f"{name}.lora_A.weight", torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5))
            out.append((f"{name}.lora_B.weight", 0.1 * std * torch.randn(out_dim, rank, generator=g)))
    return out


def with_weights(hf, named, lora_scale: float = 0.0):
    """A copy of `hf` with full weights, or with LoRA adapters merged into its weights."""
    model = copy.deepcopy(hf)
    params = dict(model.named_parameters())
    with torch.no_grad():
        if not lora_scale:
            for name, value in named:
                params[name].copy_(value)
            return model
        tensors = dict(named)
        for name in [n for n in tensors if ".lora_A." in n]:
            module = name.split(".lora_A.")[0]
            params[module + ".weight"] += lora_scale * (tensors[f"{module}.lora_B.weight"] @ tensors[name])
    return model


def drift(reference, served, sequences: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        a, b = reference(sequences).logits, served(sequences).logits
    return (a - b).abs().max().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


STORIES = ["Once upon a time, there was a little girl named Lily. She loved to play in the park with her dog.",
           "Tom had a big red ball. One day, he kicked it so high that it went over the fence and into the garden.",
           "The sun was shining and the birds were singing. Mia and her mom went to the beach to build a castle.",
           "There was a small cat who lived in a tree. Every morning the cat looked down at the busy street."]


def eval_tokens(folder: Path, vocab: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Teacher-forced sequences [4, T] and 8 greedy prompts: real text when the model has a tokenizer
    (a pretrained model's drift is meaningful in distribution), random ids otherwise (random-init model)."""
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        encoded = [tokenizer.encode(text) for text in STORIES]
        length = min(map(len, encoded))
        sequences = torch.tensor([ids[:length] for ids in encoded])
        prompts = [ids[:n] for ids in encoded for n in (6, 12)]
        return sequences, prompts
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (4, 64), generator=g), [torch.randint(3, vocab, (16,), generator=g).tolist()
                                                         for _ in range(8)]


def server_greedy(client, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    return [c.token_ids for c in client.generate(prompts, temperature=0.0, max_new_tokens=new_tokens,
                                                 min_new_tokens=new_tokens)]


def bench_model(label: str, folder: Path, args, token_file: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from clients.client import TandemClient
    from serving.rpc.server import start_server

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    sequences, prompts = eval_tokens(folder, hf.config.vocab_size)
    server = start_server(EngineConfig(model=str(folder), num_kv_blocks=256), port=0,
                          push_token_file=str(token_file))
    rows = []
    try:
        client = TandemClient(server.address, timeout=600)
        for mode in ("full", "lora"):
            scale = 2.0 if mode == "lora" else 0.0
            update = full_update(hf, 1) if mode == "full" else lora_update(hf, args.lora_rank, 2)
            reference = with_weights(hf, update, scale)
            exact_greedy = None
            for encoding in ENCODINGS:
                reports = [push_weights(server.address, update, token=TOKEN, encoding=encoding,
                                        block_size=args.block_size, lora=bool(scale), lora_scale=scale,
                                        num_tensors=len(update), origin=f"benchmark {mode} {encoding}")
                           for _ in range(args.rounds)]
                received = [(n, roundtrip(v, encoding, args.block_size)) for n, v in update]
                max_dlogit, top1 = drift(reference, with_weights(hf, received, scale), sequences)
                greedy = server_greedy(client, prompts, args.new_tokens)
                exact_greedy = greedy if encoding == "float32" else exact_greedy
                same = sum(a == b for a, b in zip(greedy, exact_greedy)) / len(prompts)
                rows.append(dict(model=label, mode=mode, encoding=encoding, tensors=len(update),
                                 mib=reports[0].bytes_sent / 2**20,
                                 push_s=[r.push_s for r in reports], stage_s=[r.stage_s for r in reports],
                                 swap_ms=[r.swap_s * 1e3 for r in reports], max_dlogit=max_dlogit, top1=top1,
                                 greedy_same=same))
                print_row(rows[-1])
        client.close()
    finally:
        server.stop(grace=1.0)
    return rows


HEADER = (f"{'model':<12} {'mode':<5} {'encoding':<9} {'tensors':>7} {'MiB sent':>9} {'vs fp32':>8} "
          f"{'push s (min/med)':>17} {'stage s':>8} {'swap ms':>8} {'max|dlogit|':>11} {'top-1':>6} {'greedy=':>7}")


def print_row(r: dict, fp32_mib: float | None = None) -> None:
    ratio = f"{r['mib'] / fp32_mib:.3f}" if fp32_mib else ""
    print(f"{r['model']:<12} {r['mode']:<5} {r['encoding']:<9} {r['tensors']:>7} {r['mib']:>9.3f} {ratio:>8} "
          f"{min(r['push_s']):>8.3f}/{statistics.median(r['push_s']):<8.3f} {min(r['stage_s']):>8.3f} "
          f"{min(r['swap_ms']):>8.2f} {r['max_dlogit']:>11.4f} {r['top1']:>6.3f} {r['greedy_same']:>7.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tinystories", "llama-25m"],
                        help="tinystories, llama-25m, or local HF folders")
    parser.add_argument("--tinystories", default=str(TINYSTORIES), help="TinyStories-656K folder")
    parser.add_argument("--block-size", type=int, default=256, help="int8/int4 block size")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="pushes per configuration (min and median)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt for greedy=")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        write_private(token_file, TOKEN)
        rows = []
        print(HEADER)
        for name in args.models:
            if name == "tinystories":
                folder, label = Path(args.tinystories), "tinystories"
            elif name == "llama-25m":
                folder, label = save_random_checkpoint(Path(tmp) / "llama25m", "llama", seed=0, **LLAMA_25M), "llama-25m"
            else:
                folder, label = Path(name), Path(name).name[:12]
            rows += bench_model(label, folder, args, token_file)
    print("\nsummary (bytes relative to the float32 push of the same model and mode)")
    print(HEADER)
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["mode"] == r["mode"] and x["encoding"] == "float32")
        print_row(r, base["mib"])


if __name__ == "__main__":
    main()
