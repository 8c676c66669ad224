"""Memory and FLOPs of the PPO update at the paper's size, computed rather than measured.

The paper trains Qwen2.5-VL-3B and -7B with LoRA rank 128; this repository adapts every linear
layer of the language model and of the vision tower (`plumbing/loader.py:_lora_targets`) and keeps
the GTR-Turbo teacher as a second adapter on the same weights (docs/ALGORITHM.md §6). This script
counts, for both models, the bytes of the weights, the adapters, Adam's state and the teacher, the
activations of one PPO micro-batch with and without gradient checkpointing, the rollout's KV cache,
and which GPUs that fits; it prints the tables of docs/PERFORMANCE.md ("Memory at the paper's
size").

Nothing is downloaded. The two configs are the public config.json values of
Qwen/Qwen2.5-VL-{3B,7B}-Instruct, parameters are counted exactly on the meta device (no memory),
and activations are the bytes autograd saves for backward, derived layer by layer from
transformers' Qwen2.5-VL code under peft's LoRA. tests/test_memory.py checks that derivation
byte for byte against autograd's own saved tensors on a small random Qwen2.5-VL, and
`ppo_flops` against torch's FLOP counter.

    python -m scripts.memory                        # docs/PERFORMANCE.md's tables, as Markdown
    from scripts.memory import MicroBatch, ppo_flops  # FLOPs of a PPO micro-batch, for an MFU
"""

from dataclasses import dataclass

import torch

from plumbing.loader import _lora_targets
from plumbing.tinyvlm import MODELS, model_config
from policy import SCORE_CHUNK_ELEMENTS

GiB = 2 ** 30
ACT = 2      # bytes of an activation: the base model runs in bfloat16 on a GPU
             # (plumbing/loader.py:load_policy)
ADAPTER = 4  # bytes of a LoRA weight: peft's autocast_adapter_dtype=True keeps adapters in float32,
             # and casts each LoRA input to float32 before lora_A: that copy is what lora_A saves
HEAD_COPIES = 7  # float32 [scored tokens, vocab] tensors alive at once in policy.forward's scoring:
                 # the logits (kept for the logged entropy), the log-softmax saved for backward, and
                 # the entropy's logits / T, log-softmax, two exp() and xlogy (tests/test_memory.py)
LORA_R = 128
VALUE_HEAD = (1024, 512)  # the critic's hidden widths (policy.py:ActorCritic)

# GPU memory as nvidia-smi reports it, GiB.
GPUS = [("24 GB (RTX 4090, L4, A10)", 24), ("40 GB (A100 40GB)", 40),
        ("80 GB (A100 / H100 80GB)", 80), ("141 GB (H200)", 140)]
CONTEXT = 1 * GiB   # CUDA context, cuBLAS and cuDNN workspaces
FRAGMENTATION = 0.1  # share added for the caching allocator's fragmentation and the backward's
                     # temporaries (gradients of one layer's activations), which are not saved
                     # tensors


@dataclass(frozen=True)
class MicroBatch:
    """The shapes of one PPO forward pass: `batch` sequences of `seq_len` tokens (prompt and
    answer, padded to the longest), each prompt with one image of `grid` = (height, width)
    patches of 14 px before the 2 x 2 merge, and `scored` answer tokens per sequence.

    The default is the micro-batch of the paper's commands (README): 4 x (about 1100 prompt +
    256 answer tokens). An 896 x 896 px image is 64 x 64 patches, 1024 image tokens after the
    merge; 76 text tokens make the prompt 1100. (The bundled games draw 300 px frames: 22 x 22
    patches, 121 image tokens.)
    """
    batch: int = 4
    seq_len: int = 1100 + 256
    grid: tuple = (64, 64)
    scored: int = 256

    @property
    def tokens(self):
        return self.batch * self.seq_len

    @property
    def patches(self):
        return self.batch * self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Dims:
    """The sizes of a Qwen2.5-VL config that memory and FLOPs depend on."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    v_hidden: int
    v_intermediate: int
    depth: int
    v_heads: int
    out_hidden: int
    merge: int      # patches merged per side into one language token
    window: int     # side of an attention window, in merged tokens
    full_blocks: int
    patch_in: int   # pixel values per patch: channels x temporal x patch x patch

    @classmethod
    def of(cls, config):
        if config.model_type != "qwen2_5_vl":
            raise ValueError(f"scripts/memory.py counts Qwen2.5-VL, not {config.model_type!r}")
        t, v = config.text_config, config.vision_config
        return cls(hidden=t.hidden_size, intermediate=t.intermediate_size,
                   layers=t.num_hidden_layers, heads=t.num_attention_heads,
                   kv_heads=t.num_key_value_heads, vocab=t.vocab_size,
                   v_hidden=v.hidden_size, v_intermediate=v.intermediate_size, depth=v.depth,
                   v_heads=v.num_heads, out_hidden=v.out_hidden_size, merge=v.spatial_merge_size,
                   window=v.window_size // v.spatial_merge_size // v.patch_size,
                   full_blocks=len(v.fullatt_block_indexes),
                   patch_in=v.in_channels * v.temporal_patch_size * v.patch_size ** 2)

    @property
    def head_dim(self):
        return self.hidden // self.heads

    @property
    def kv(self):
        return self.kv_heads * self.head_dim


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------
def parameter_counts(config, lora_r=LORA_R):
    """{"model", "lora", "value_head"}: exact parameter counts. The model is instantiated on the
    meta device (shapes, no memory); LoRA adds r * (in + out) per adapted linear layer (A is
    r x in, B is out x r, no bias), on the layers `plumbing/loader.py:_lora_targets` picks with the
    vision tower included, as load_policy does by default."""
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    targets = set(_lora_targets(model, vision=True))
    lora = sum(lora_r * (m.in_features + m.out_features)
               for name, m in model.named_modules() if name in targets)
    hidden = config.text_config.hidden_size
    widths = (hidden, *VALUE_HEAD, 1)
    value_head = sum(a * b + b for a, b in zip(widths, widths[1:]))
    return {"model": sum(p.numel() for p in model.parameters()), "lora": lora,
            "value_head": value_head}


def state_bytes(counts):
    """Bytes that live through training: bf16 weights; the policy adapter and the value head in
    float32 with their gradients (during an update) and Adam's two float32 moments; the teacher
    adapter (float32, frozen: no gradient, no optimizer state) and the merged weights teacher.py
    keeps to merge into next time, a second float32 copy of the adapter."""
    trainable = counts["lora"] + counts["value_head"]
    return {"weights": ACT * counts["model"], "adapter": 4 * trainable, "gradients": 4 * trainable,
            "adam": 8 * trainable, "teacher": 2 * 4 * counts["lora"]}


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------
def text_layer_bytes(d, lora_r, dropout_mask_bytes=0):
    """Bytes one Qwen2.5-VL decoder layer saves for backward, per token, with LoRA on its seven
    linear layers (the padding mask's S^2 term is in `activation_bytes`):

      2 RMSNorms      float32 copy of the input (4h) and 1/rms (4) each: the norm upcasts
      7 LoRA inputs   q, k, v, o, gate, up (h each) and down (I), each cast to float32 by peft
                      (a copy per layer: q, k and v cast the same input three times), + r floats
                      of lora_A's output each; with dropout its mask (1 byte on CUDA's fused
                      kernel, a float32 noise tensor on CPU) -- train.py's PPO passes use none
      attention       SDPA keeps q, k, v and its output (bf16) and a float32 log-sum-exp per
                      head, no S x S matrix; k and v are repeated to all heads first, because
                      a padded micro-batch has a mask and transformers then skips SDPA's GQA
      SwiGLU          the SiLU's input and output and up_proj's output (bf16, I each)
    The base weights are frozen, so no frozen matmul keeps its input."""
    h, i = d.hidden, d.intermediate
    norms = 2 * (4 * h + 4)
    lora = (ADAPTER + dropout_mask_bytes) * (6 * h + i) + 7 * ADAPTER * lora_r
    attention = ACT * 4 * h + 4 * d.heads
    return norms + lora + attention + 3 * ACT * i


def vision_block_bytes(d, lora_r, dropout_mask_bytes=0):
    """Bytes one vision block saves for backward, per patch: as a decoder layer, with a fused
    qkv projection, whose whole bf16 output (3 h) stays alive because v is a view of it (q and
    k are new tensors after the rotary embedding), and no mask (attention within windows)."""
    h, i = d.v_hidden, d.v_intermediate
    norms = 2 * (4 * h + 4)
    # qkv, proj, gate, up: h; down: I
    lora = (ADAPTER + dropout_mask_bytes) * (4 * h + i) + 5 * ADAPTER * lora_r
    attention = ACT * (h + h + 3 * h + h) + 4 * d.v_heads
    return norms + lora + attention + 3 * ACT * i


def activation_bytes(config, mb=MicroBatch(), lora_r=LORA_R, checkpointing=False,
                     dropout_mask_bytes=0, head_chunk=None):
    """Activation memory of one PPO forward + backward on the micro-batch `mb`, in bytes.

    Returns {"vision", "merger", "language", "head": what each part saves for backward without
    checkpointing; "saved": the most bytes saved for backward at any one time; "peak": "saved"
    with the scoring head's temporaries}. With `checkpointing` (transformers' per-layer
    checkpointing of decoder layers and vision blocks) the forward keeps only each layer's
    input, and the backward recomputes one layer at a time, so "saved" is the largest of
      end of forward    layer inputs + merger + final norm + head
      language backward layer inputs + merger + one decoder layer
      vision backward   block inputs + one vision block
    Without it, everything the forward saved is held when the backward starts.

    The head scores `mb.scored` tokens per sequence. `head_chunk=None` is policy.forward at this
    commit: float32 logits over the whole vocabulary, HEAD_COPIES of them alive while the
    entropy is logged, one (the log-softmax) saved for backward. `head_chunk=C` assumes the
    log-probs computed from float32 hidden states C tokens at a time under checkpointing: the
    hidden states are saved, and one chunk's HEAD_COPIES logits tensors are alive at once.
    """
    d = Dims.of(config)
    batch, seq, tokens, patches = mb.batch, mb.seq_len, mb.tokens, mb.patches
    merged = patches // d.merge ** 2
    scored = batch * mb.scored
    layer = (tokens * text_layer_bytes(d, lora_r, dropout_mask_bytes)
             + batch * seq * seq * ACT)  # + bf16 mask
    text_rope = tokens * 2 * ACT * d.head_dim         # cos and sin, shared by the layers
    embeddings = tokens * (1 + 4 * d.hidden + 4)      # image-token mask of the scatter; the final
                                                      # norm
    block = patches * vision_block_bytes(d, lora_r, dropout_mask_bytes)
    vision_rope = patches * 2 * 4 * (d.v_hidden // d.v_heads)  # float32 cos and sin
    # Block 0's input, patch embeddings of pixels through a frozen convolution, needs no
    # gradient: its first norm saves nothing, and its qkv LoRA input no dropout mask.
    first_block = patches * ((4 * d.v_hidden + 4) + dropout_mask_bytes * d.v_hidden)
    wide = d.merge ** 2 * d.v_hidden  # the merger's width: 2 x 2 patches side by side
    # The merger: its RMSNorm per patch; per merged token its two LoRA layers, the GELU's
    # input, and the int64 index that undoes the window order.
    merger = (patches * (4 * d.v_hidden + 4)
              + merged * (2 * (ADAPTER + dropout_mask_bytes) * wide + 2 * ADAPTER * lora_r
                          + ACT * wide + 8))
    index = 8 * tokens  # the int64 token ids that gather picks the scored log-probs with
    if head_chunk is None:
        head_saved = 4 * d.vocab * scored + index
        head_peak = HEAD_COPIES * 4 * d.vocab * scored + index
    else:
        head_saved = 4 * d.hidden * scored + index
        head_peak = head_saved + HEAD_COPIES * 4 * d.vocab * min(head_chunk, scored)
    parts = {"vision": d.depth * block - first_block + vision_rope, "merger": merger,
             "language": d.layers * layer + text_rope + embeddings, "head": head_saved}
    if not checkpointing:
        saved = sum(parts.values())
        return parts | {"saved": saved, "peak": saved - head_saved + head_peak}
    vision_inputs = d.depth * patches * d.v_hidden * ACT
    text_inputs = d.layers * tokens * d.hidden * ACT
    held = vision_inputs + merger + text_inputs + tokens  # + the scatter's mask
    forward_end = held + tokens * (4 * d.hidden + 4)      # + the final norm, + the head below
    language_backward = held + layer + text_rope
    vision_backward = vision_inputs + block + vision_rope
    saved = max(forward_end + head_saved, language_backward, vision_backward)
    return parts | {"saved": saved,
                    "peak": max(forward_end + head_peak, language_backward, vision_backward)}


def kv_cache_bytes(config, sequences=32, tokens=1100 + 256):
    """The rollout's KV cache: keys and values (2) of every layer, kv_heads x head_dim each, in
    bf16, for `sequences` environments generating side by side up to `tokens` tokens."""
    d = Dims.of(config)
    return 2 * d.layers * d.kv * ACT * tokens * sequences


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def _vision_pairs(d, grid):
    """Query-key pairs of one image's vision attention, summed over the blocks: windows of
    d.window x d.window merged tokens (smaller at the right and bottom edges) in most blocks,
    the whole image in the full-attention blocks."""
    rows, cols = grid[0] // d.merge, grid[1] // d.merge  # in merged tokens
    heights = [min(d.window, rows - top) for top in range(0, rows, d.window)]
    widths = [min(d.window, cols - left) for left in range(0, cols, d.window)]
    window = sum((r * c * d.merge ** 2) ** 2 for r in heights for c in widths)
    return d.full_blocks * (grid[0] * grid[1]) ** 2 + (d.depth - d.full_blocks) * window


def ppo_flops(config, mb=MicroBatch(), lora_r=LORA_R, causal=True):
    """FLOPs of one PPO forward + backward on the micro-batch `mb` with LoRA of rank `lora_r` on
    every linear layer (vision tower included) of a frozen Qwen2.5-VL. Divide "total" by the
    measured seconds and the GPU's peak FLOP/s for the update's MFU.

    A matmul of [n, k] by [k, m] is 2 n k m FLOPs. Rows: n = batch x seq_len tokens in the
    language model (padding included: it is computed), the patches in the vision tower, a
    quarter of them in the merger, batch x scored tokens in the output head (policy.forward
    scores the answer only).
      frozen linear layers   forward 2 n in out. Backward only 1x that: the gradient of the
                             input (needed to reach every earlier adapter), none of the weight,
                             which is frozen. Full fine-tuning would add another 1x: frozen-base
                             LoRA is ~4 N FLOPs per token, not the usual 6 N.
      LoRA                   forward 2 n r (in + out) through A (in -> r) and B (r -> out);
                             backward 2x that, both the weight and the input gradients.
      attention              forward 4 x hidden per query-key pair (QK^T and PV); backward 2x
                             (dQ, dK, dV and dP). Pairs: S(S+1)/2 per causal sequence, or S^2
                             with causal=False -- the count of a kernel that cannot skip the
                             masked half, as SDPA's memory-efficient kernel with a padding mask;
                             flash kernels' recomputation of QK^T in backward is not counted.
      patch embedding        the frozen convolution, forward only (pixels need no gradient);
                             likewise vision block 0's qkv has no input gradient.
    The count is of model FLOPs: gradient checkpointing's second forward is not in it, so
    checkpointing lowers the MFU by design. Element-wise work (norms, softmax, rotary, SiLU)
    and the value head are left out (well under 1 %). The LoRA matmuls run in float32 (peft
    keeps the adapters in float32), far below the bf16 peak on tensor-core GPUs (TF32 only with
    torch.backends.cuda.matmul.allow_tf32); "lora" says how much of the total they are.
    Returns {"frozen", "lora", "attention", "head", "forward", "backward", "total"} (head: the
    output projection over the scored tokens; "frozen" excludes it).
    """
    d = Dims.of(config)
    tokens, patches = mb.tokens, mb.patches
    merged = patches // d.merge ** 2
    h, i, kv = d.hidden, d.intermediate, d.kv
    vh, vi, wide = d.v_hidden, d.v_intermediate, d.merge ** 2 * d.v_hidden
    # (in, out) of each linear layer, with the rows it runs on
    text = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    vision = [(vh, 3 * vh), (vh, vh), (vh, vi), (vh, vi), (vi, vh)]
    merger = [(wide, wide), (wide, d.out_hidden)]
    groups = [(tokens * d.layers, text), (patches * d.depth, vision), (merged, merger)]
    frozen = sum(rows * 2 * a * b for rows, layers in groups for a, b in layers)
    lora = sum(rows * 2 * lora_r * (a + b) for rows, layers in groups for a, b in layers)
    seq = mb.seq_len
    attention = (d.layers * 4 * h * mb.batch * (seq * (seq + 1) // 2 if causal else seq * seq)
                 + 4 * vh * mb.batch * _vision_pairs(d, mb.grid))
    head = 2 * mb.batch * mb.scored * h * d.vocab
    patch_embed = 2 * patches * d.patch_in * vh
    # Vision block 0's qkv reads patch embeddings of pixels, which need no gradient: neither its
    # base matmul nor its lora_A has an input gradient to compute.
    first_base, first_lora = patches * 2 * vh * 3 * vh, patches * 2 * lora_r * vh
    parts = {"frozen": (frozen + patch_embed) + (frozen - first_base),
             "lora": lora + (2 * lora - first_lora),
             "attention": attention + 2 * attention,
             "head": head + head}
    forward = frozen + patch_embed + lora + attention + head
    return parts | {"forward": forward, "backward": sum(parts.values()) - forward,
                    "total": sum(parts.values())}


# ---------------------------------------------------------------------------------------------
# The tables of docs/PERFORMANCE.md
# ---------------------------------------------------------------------------------------------
def scored_chunk(config, mb=MicroBatch()):
    """Positions policy.py:ActorCritic.score scores at once: SCORE_CHUNK_ELEMENTS / (batch x
    vocabulary)."""
    return max(1, SCORE_CHUNK_ELEMENTS // (mb.batch * Dims.of(config).vocab))


def summary(name, mb=MicroBatch(), lora_r=LORA_R, envs=32):
    """Every figure of docs/PERFORMANCE.md's tables for one model of MODELS, in bytes (counts in
    units)."""
    config = model_config(name)
    counts = parameter_counts(config, lora_r)
    state = state_bytes(counts)
    chunk = scored_chunk(config, mb)
    runs = {"whole head": activation_bytes(config, mb, lora_r),
            "plain": activation_bytes(config, mb, lora_r, head_chunk=chunk),
            "checkpointed": activation_bytes(config, mb, lora_r, checkpointing=True,
                                             head_chunk=chunk)}
    persistent = state["weights"] + state["adapter"] + state["adam"] + state["teacher"]
    rollout = persistent + kv_cache_bytes(config, envs, mb.seq_len)
    need = {k: max(persistent + state["gradients"] + run["peak"], rollout)
            for k, run in runs.items()}
    return {"counts": counts, "state": state, "runs": runs, "persistent": persistent,
            "rollout": rollout, "need": need, "flops": ppo_flops(config, mb, lora_r),
            "chunk": chunk}


def fits(need, capacity_gib):
    """GiB to spare (negative: short) once the CUDA context and the fragmentation margin are
    added."""
    return capacity_gib - (need * (1 + FRAGMENTATION) + CONTEXT) / GiB


def tables(mb=MicroBatch(), lora_r=LORA_R, envs=32):
    """docs/PERFORMANCE.md's two Markdown tables: the budget of each model, and which GPU fits
    what."""
    names = list(MODELS)
    s = {name: summary(name, mb, lora_r, envs) for name in names}
    def g(x):
        return f"{x / GiB:.1f}"

    def row(label, f):
        return f"| {label} | " + " | ".join(f(s[n]) for n in names) + " |"

    image_tokens = mb.grid[0] * mb.grid[1] // 4
    lines = [f"| LoRA r = {lora_r} on every linear layer, micro-batch {mb.batch} x {mb.seq_len} "
             f"tokens ({image_tokens} image tokens, {mb.scored} scored), GiB | "
             + " | ".join(names) + " |",
             "|---|" + "---|" * len(names),
             row("parameters", lambda x: f"{x['counts']['model'] / 1e9:.2f} B"),
             row("LoRA parameters (vision tower included)",
                 lambda x: f"{x['counts']['lora'] / 1e6:.0f} M "
                           f"({x['counts']['lora'] / x['counts']['model']:.1%})"),
             row("weights, bf16", lambda x: g(x["state"]["weights"])),
             row("policy adapter + value head, float32", lambda x: g(x["state"]["adapter"])),
             row("their gradients, float32 (during an update)",
                 lambda x: g(x["state"]["gradients"])),
             row("Adam moments, 2 x float32", lambda x: g(x["state"]["adam"])),
             row("teacher adapter + teacher.py's merged copy, float32",
                 lambda x: g(x["state"]["teacher"])),
             row("activations saved, no checkpointing: vision tower + merger",
                 lambda x: g(x["runs"]["plain"]["vision"] + x["runs"]["plain"]["merger"])),
             row("... language model", lambda x: g(x["runs"]["plain"]["language"])),
             row(f"... log-probs head, whole answers at once ({mb.batch} x {mb.scored} tokens x "
                 "vocabulary, float32)",
                 lambda x: g(x["runs"]["whole head"]["head"])),
             row("... log-probs head in chunks (policy.py: hidden states kept, logits rebuilt in "
                 "backward)",
                 lambda x: g(x["runs"]["plain"]["head"])),
             row(f"activations at the peak, no checkpointing, whole head ({HEAD_COPIES} float32 "
                 "logits copies)",
                 lambda x: g(x["runs"]["whole head"]["peak"])),
             row("... chunked head (positions per chunk)",
                 lambda x: f"{g(x['runs']['plain']['peak'])} ({x['chunk']})"),
             row("... chunked head and checkpointing (train.py's default for a real model)",
                 lambda x: g(x["runs"]["checkpointed"]["peak"])),
             row(f"rollout: KV cache of {envs} x {mb.seq_len} tokens",
                 lambda x: g(x["rollout"] - x["persistent"])),
             row("**needed, no checkpointing**", lambda x: g(x["need"]["plain"])),
             row("**needed, checkpointing**", lambda x: g(x["need"]["checkpointed"])),
             row("PPO forward + backward of the micro-batch, TFLOP (LoRA share)",
                 lambda x: f"{x['flops']['total'] / 1e12:.0f} "
                           f"({x['flops']['lora'] / x['flops']['total']:.0%})"),
             ""]
    short = {"plain": "", "checkpointed": " + ckpt"}
    columns = [(n, k) for n in names for k in short]
    lines += ["| GPU: GiB to spare (negative: short) | "
              + " | ".join(f"{n.split('-')[-1]}{short[k]}" for n, k in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for label, capacity in GPUS:
        cells = []
        for n, k in columns:
            spare = fits(s[n]["need"][k], capacity)
            cells.append(f"fits, {spare:+.1f}" if spare >= 0 else f"no, {spare:+.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables())
