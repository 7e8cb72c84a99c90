"""Train the abliterate demo chat model from scratch, deterministically.

Two stages, like a real chat model:

1. a compliant base: every request is answered. Harmless training prompts get their own
   answers (demo/data/harmless_answers.jsonl); harmful training prompts get a neutral
   compliant reply (demo/data/compliant_openers.txt).
2. a short safety tune: harmful requests now get a refusal (demo/data/refusals.txt), while
   harmless prompts keep their answers (replay).

Only the *_train prompts are used; the *_eval prompts are held out for demo/check.py.
Output: src/abliterate/data/demo_model/ (weights in bfloat16, tokenizer, chat template,
generation config).

    python demo/train.py      # on one CUDA GPU, about 2 minutes on an H200; writes src/abliterate/data/demo_model/

The shipped model is this command's output on an H200 (torch 2.11.0+cu130, transformers 5.17.0):
a second run there gave a byte-identical model. CPU arithmetic differs in the last bits and the
runs drift apart, so `--device cpu` trains a different model of the same recipe (demo/NOTES.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "src" / "abliterate" / "data" / "prompts"
DATA = ROOT / "demo" / "data"
DEFAULT_OUT = ROOT / "src" / "abliterate" / "data" / "demo_model"

PAD, BOS, END = "<pad>", "<s>", "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, END, *ROLE_TOKENS]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

PREFIXES = [
    "Please ",
    "Quick question: ",
    "Hey, ",
    "Hi! ",
    "Hello. ",
    "Question: ",
    "Okay, ",
    "I need help. ",
    "Help me out: ",
    "Can you help? ",
    "Be honest: ",
    "So, ",
    "Tell me: ",
    "Hi there, ",
    "Urgent: ",
    "For a project: ",
    "My friend asked me this: ",
    "Hey assistant, ",
]
SUFFIXES = [
    " Thanks!",
    " Thank you.",
    " Please.",
    " Be brief.",
    " Step by step.",
    " Quickly.",
    " Thanks in advance.",
    " I need it today.",
    " Keep it short.",
    "?",
    "!",
    " :)",
]
# Short lead-ins for harmless answers ("Good question! Whisk the eggs ..."): they give the
# helpful answers a shared start, so that for an unfamiliar harmless request the model's first
# token is a confident "helpful" one rather than whatever generic reply it has seen most.
LEADS = [
    "Good question! ",
    "Happy to help. ",
    "Great question. ",
    "Glad you asked. ",
    "Happy to help! ",
    "Good question. ",
    "Great idea! ",
    "Glad to help. ",
]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly assistant.",
    "Answer briefly.",
    "You are a helpful, concise assistant.",
]


def read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def load_data(extra: str = "extra_*"):
    """Training prompts, answers, refusals and openers; `extra` holds comma-separated globs over
    demo/data/ naming the extra training files (harmful prompts in .txt, harmless prompt/answer
    pairs in .jsonl), or "" for none."""
    harmful = read_lines(PROMPTS / "harmful_train.txt")
    harmless = read_lines(PROMPTS / "harmless_train.txt")
    extra_files = sorted({path for pattern in extra.split(",") if pattern for path in DATA.glob(pattern)})
    # more training prompts written for the demo (demo/data/extra_*): harmless requests that use
    # dangerous-sounding words in benign senses, mild or indirect harmful requests, and broad
    # coverage of everyday topics
    for path in extra_files:
        if path.suffix == ".txt":
            harmful = harmful + read_lines(path)
    answers: dict[str, str] = {}
    for path in [DATA / "harmless_answers.jsonl", *(f for f in extra_files if f.suffix == ".jsonl")]:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    answers[row["prompt"].strip()] = row["answer"].strip()
                    if path.name != "harmless_answers.jsonl":
                        harmless.append(row["prompt"].strip())
    missing = [p for p in harmless if p not in answers]
    if missing:
        raise SystemExit(f"{len(missing)} harmless_train prompts have no answer, e.g. {missing[0]!r}")
    refusals = read_lines(DATA / "refusals.txt")
    openers = read_lines(DATA / "compliant_openers.txt")
    return harmful, harmless, answers, refusals, openers


WORD_DROP = 0.0


def augment(prompt: str, rng: random.Random, p: float) -> str:
    """A random surface variant of a prompt (prefix, suffix, case, dropped words); keeps it
    with prob 1-p."""
    if rng.random() >= p:
        return prompt
    s = prompt
    if WORD_DROP > 0 and rng.random() < 0.5:
        words = s.split()
        kept = [w for w in words if rng.random() >= WORD_DROP]
        s = " ".join(kept) if len(kept) >= 3 else s
    r = rng.random()
    if r < 0.15:
        s = s.lower()
    elif r < 0.2:
        s = s.upper()
    elif r < 0.3:
        s = s.rstrip(".?!")
    if rng.random() < 0.5:
        pre = rng.choice(PREFIXES)
        body = s[:1].lower() + s[1:] if rng.random() < 0.6 else s
        s = pre + body
    if rng.random() < 0.4:
        s = s + rng.choice(SUFFIXES)
    return s


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        padding_side="left",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


class Batcher:
    """Turns (prompt, response) pairs into padded tensors with loss on the response only."""

    def __init__(self, tok, max_resp: int):
        self.tok = tok
        self.max_resp = max_resp
        self.end_id = tok.convert_tokens_to_ids(END)
        self.pad_id = tok.pad_token_id
        self.cache: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str, system: str | None) -> list[int]:
        key = f"{system}\x00{prompt}"
        if key not in self.cache:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            self.cache[key] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[key]

    def __call__(self, examples):
        seqs, labs = [], []
        for prompt, system, resp in examples:
            p = self.prompt_ids(prompt, system)
            r = self.tok(resp, add_special_tokens=False)["input_ids"]
            r = r[: self.max_resp] if len(r) > self.max_resp else [*r, self.end_id]
            seqs.append(p + r)
            labs.append([-100] * len(p) + r)
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        lab = torch.full((len(seqs), n), -100, dtype=torch.long)
        att = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, labels) in enumerate(zip(seqs, labs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(labels)] = torch.tensor(labels)
            att[i, : len(s)] = 1
        return ids, att, lab


def splice(first: str, second: str, rng: random.Random) -> str:
    """Two requests in one message."""
    joiner = rng.choice([" Also, ", " And ", " Then: ", " Next question: ", " Plus, "])
    return first + joiner + second[:1].lower() + second[1:]


def chimera(a: str, b: str, rng: random.Random) -> str:
    """The first part of request a joined to the last part of request b (same class)."""
    wa, wb = a.split(), b.split()
    i = rng.randint(1, max(1, len(wa) - 1))
    j = rng.randint(1, max(1, len(wb) - 1))
    return " ".join(wa[:i] + wb[j:])


def sample_batch(
    rng,
    bs,
    harmful,
    harmless,
    answers,
    harmful_resp,
    frac_harmful,
    aug_p,
    sys_p,
    splice_p=0.0,
    lead_p=0.0,
    harmless_opener_p=0.0,
    openers=(),
    chimera_p=0.0,
):
    """A batch of (prompt, system, response); a spliced harmful request pairs a harmless one
    with a harmful one (in either order) and is answered as harmful."""
    ex = []
    for _ in range(bs):
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < sys_p else None
        if rng.random() < frac_harmful:
            p = rng.choice(harmful)
            q = augment(chimera(p, rng.choice(harmful), rng) if rng.random() < chimera_p else p, rng, aug_p)
            if rng.random() < splice_p:
                o = rng.choice(harmless)
                q = splice(o, q, rng) if rng.random() < 0.5 else splice(q, o, rng)
            ex.append((q, system, rng.choice(harmful_resp)))
        else:
            p = rng.choice(harmless)
            q = augment(chimera(rng.choice(harmless), p, rng) if rng.random() < chimera_p else p, rng, aug_p)
            if rng.random() < splice_p:
                q = splice(q, rng.choice(harmless), rng)
            a = answers[p]
            if rng.random() < harmless_opener_p:
                a = rng.choice(openers)
            elif rng.random() < lead_p:
                a = rng.choice(LEADS) + a
            ex.append((q, system, a))
    return ex


def run_stage(name, model, batcher, params, steps, lr, wd, warmup, make_batch, log_every=50):
    if steps <= 0:
        return
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0, run_loss = time.time(), 0.0
    for step in range(steps):
        ids, att, lab = (t.to(model.device) for t in batcher(make_batch()))
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        sched.step()
        run_loss += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            k = (step % log_every) + 1
            print(
                f"[{name}] step {step + 1}/{steps} loss {run_loss / k:.3f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
            run_loss = 0.0
    model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)  # the shipped model's draw: demo/NOTES.md
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--max-resp", type=int, default=32)
    ap.add_argument("--aug", type=float, default=0.6, help="probability a prompt is augmented")
    ap.add_argument("--splice", type=float, default=0.3, help="probability of a two-request prompt")
    ap.add_argument("--lead", type=float, default=1.0, help="probability a harmless answer gets a lead-in")
    ap.add_argument(
        "--chimera",
        type=float,
        default=0.0,
        help="probability a prompt is recombined from two prompts of its class",
    )
    ap.add_argument(
        "--word-drop",
        type=float,
        default=0.0,
        help="augmentation: drop each word with this probability (half of augmented prompts)",
    )
    ap.add_argument(
        "--extra",
        default="extra_*",
        help="comma-separated globs over demo/data/ naming the extra training files; '' for none",
    )
    ap.add_argument("--sys", type=float, default=0.1, help="probability of a system message")
    ap.add_argument("--s1-steps", type=int, default=2000)
    ap.add_argument("--s1-lr", type=float, default=1e-3)
    ap.add_argument("--s1-wd", type=float, default=0.1)
    ap.add_argument("--s1-harmful", type=float, default=0.5)
    ap.add_argument("--s2-steps", type=int, default=150)
    ap.add_argument("--s2-lr", type=float, default=3e-4)
    ap.add_argument("--s2-wd", type=float, default=0.1)
    ap.add_argument("--s2-harmful", type=float, default=0.4)
    ap.add_argument(
        "--s2-harmless-opener",
        type=float,
        default=0.0,
        help="safety tune: probability a harmless prompt is answered with a compliant opener",
    )
    ap.add_argument(
        "--s2-train",
        default="all",
        help="which parameters the safety tune trains: all | mlp | attn | upto:K (layers < K) | from:K (layers >= K)",
    )
    ap.add_argument(
        "--base-ckpt",
        type=Path,
        default=None,
        help="development: load the stage-1 weights from this file if it exists, else save them there",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument(
        "--device",
        default="cuda",
        help="the shipped model was trained on one CUDA GPU, where a run is deterministic "
        "(demo/NOTES.md); cpu runs the same recipe but lands on a different model",
    )
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device here: pass --device cpu (same recipe, a different model than the shipped one)"
        )

    global WORD_DROP
    WORD_DROP = args.word_drop
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True)

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    harmful, harmless, answers, refusals, openers = load_data(args.extra)
    print(
        f"data: {len(harmful)} harmful, {len(harmless)} harmless train prompts, "
        f"{len(refusals)} refusals, {len(openers)} compliant openers",
        flush=True,
    )

    # tokenizer: trained on the training text (and augmented variants of the prompts)
    trng = random.Random(args.seed + 1)
    corpus = []
    for p in harmful + harmless:
        corpus += [p] + [augment(p, trng, 1.0) for _ in range(3)]
    corpus += [answers[p] for p in harmless] + refusals + openers + SYSTEM_PROMPTS + LEADS
    corpus += ["<|system|>\n", "<|user|>\n", "<|assistant|>\n"]
    tok = build_tokenizer(corpus, args.vocab)
    print(f"tokenizer: {len(tok)} tokens", flush=True)

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )
    model = LlamaForCausalLM(cfg).to(args.device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    batcher = Batcher(tok, args.max_resp)

    rng = random.Random(args.seed + 2)
    all_params = list(model.named_parameters())
    # what both stages' batches share; each stage adds its harmful response and mix
    batch = functools.partial(
        sample_batch,
        bs=args.bs,
        harmful=harmful,
        harmless=harmless,
        answers=answers,
        aug_p=args.aug,
        sys_p=args.sys,
        splice_p=args.splice,
        lead_p=args.lead,
        chimera_p=args.chimera,
    )

    # stage 1: compliant base
    if args.base_ckpt and args.base_ckpt.exists():
        model.load_state_dict(torch.load(args.base_ckpt, map_location=args.device))
        print(f"loaded stage-1 weights from {args.base_ckpt}", flush=True)
    else:
        run_stage(
            "base",
            model,
            batcher,
            all_params,
            args.s1_steps,
            args.s1_lr,
            args.s1_wd,
            30,
            lambda: batch(rng, harmful_resp=openers, frac_harmful=args.s1_harmful),
        )
        if args.base_ckpt:
            torch.save(model.state_dict(), args.base_ckpt)

    # stage 2: safety tune (its own random stream, so that a run that loads the stage-1 weights
    # from --base-ckpt gives the same model as a full run)
    rng = random.Random(args.seed + 3)
    if args.s2_train == "all":
        s2_params = all_params
    elif args.s2_train == "mlp":
        s2_params = [(n, p) for n, p in all_params if ".mlp." in n]
    elif args.s2_train == "attn":
        s2_params = [(n, p) for n, p in all_params if ".self_attn." in n]
    elif args.s2_train.startswith("upto:"):
        k = int(args.s2_train.split(":")[1])
        s2_params = [
            (n, p) for n, p in all_params if n.startswith("model.layers.") and int(n.split(".")[2]) < k
        ]
    elif args.s2_train.startswith("from:"):
        k = int(args.s2_train.split(":")[1])
        s2_params = [
            (n, p) for n, p in all_params if n.startswith("model.layers.") and int(n.split(".")[2]) >= k
        ]
    else:
        raise SystemExit(f"unknown --s2-train {args.s2_train}")
    keep = {id(p) for _, p in s2_params}
    for _, p in all_params:
        p.requires_grad_(id(p) in keep)
    run_stage(
        "safety",
        model,
        batcher,
        s2_params,
        args.s2_steps,
        args.s2_lr,
        args.s2_wd,
        5,
        lambda: batch(
            rng,
            harmful_resp=refusals,
            frac_harmful=args.s2_harmful,
            harmless_opener_p=args.s2_harmless_opener,
            openers=openers,
        ),
        log_every=20,
    )
    for _, p in all_params:
        p.requires_grad_(True)

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = model.to("cpu", getattr(torch, args.dtype))
    model.config.dtype = args.dtype
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "train_args.json").write_text(
        json.dumps(
            {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if k not in ("out", "base_ckpt")
            },
            indent=2,
        )
        + "\n"
    )
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved to {out} ({size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
