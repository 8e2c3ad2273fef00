"""Draws the diagrams of docs/ as PNG files, one function per diagram (deterministic, no network).

    pip install matplotlib && python docs/img/make_diagrams.py          # writes docs/img/*.png

The numbers in the pictures are the ones the pages work through (and the tests check); change a
picture here, run the script, and look at the PNG before committing it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Polygon, Rectangle  # noqa: E402

OUT = Path(__file__).parent
DPI = 100

BLUE, BLUE_L = "#4C78A8", "#D6E4F0"
ORANGE, ORANGE_L = "#E8820C", "#FDE3C8"
GREEN, GREEN_L = "#54A24B", "#D9EFD5"
RED, RED_L = "#D9534F", "#F9D6D5"
PURPLE, PURPLE_L = "#8E5BA8", "#E8DDF0"
GREY, GREY_L = "#8A8A8A", "#EEEEEE"
INK = "#222222"

plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 11, "savefig.facecolor": "white"})


# ---------------------------------------------------------------- helpers


def canvas(width: float, height: float, xmax: float, ymax: float):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, ymax)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01)
    return fig, ax


def box(
    ax,
    x,
    y,
    w,
    h,
    text="",
    fc=BLUE_L,
    ec=BLUE,
    fs=11,
    weight="normal",
    round_=True,
    lw=1.4,
    color=INK,
    ha="center",
    **kw,
):
    style = "round,pad=0,rounding_size=0.15" if round_ else "square,pad=0"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=fc, ec=ec, lw=lw, **kw))
    if text:
        tx = x + w / 2 if ha == "center" else x + 0.15
        ax.text(tx, y + h / 2, text, ha=ha, va="center", fontsize=fs, weight=weight, color=color)


def cell(ax, x, y, w, h, text="", fc="white", ec=INK, fs=10, lw=1.0, hatch=None, color=INK, weight="normal"):
    ax.add_patch(Rectangle((x, y), w, h, fc=fc, ec=ec, lw=lw, hatch=hatch))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs, color=color, weight=weight)


def arrow(ax, start, end, color=INK, lw=1.5, style="-|>", rad=0.0, ls="-", ms=14):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=ms,
            color=color,
            lw=lw,
            connectionstyle=f"arc3,rad={rad}",
            linestyle=ls,
            shrinkA=0,
            shrinkB=0,
        )
    )


def save(fig, name: str) -> None:
    path = OUT / name
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"{path}  {path.stat().st_size // 1024} KB")


# ---------------------------------------------------------------- (a) paged attention


def paged_attention() -> None:
    """Logical blocks -> block table -> physical blocks, and the slot of one token."""
    fig, ax = canvas(12, 6.6, 24, 13.2)
    bs = 4
    table = [7, 2, 5]
    num_tokens = 10

    ax.text(0.3, 12.6, "one sequence: 10 tokens, block_size = 4", fontsize=13, weight="bold")
    # Logical blocks.
    ax.text(0.3, 11.6, "logical blocks (token positions)", fontsize=11, color=GREY)
    ly = [10.2, 8.4, 6.6]
    for i in range(3):
        ax.text(0.3, ly[i] + 0.45, f"L{i}", fontsize=11, weight="bold", va="center")
        for j in range(bs):
            pos = i * bs + j
            filled = pos < num_tokens
            cell(
                ax,
                1.2 + j * 1.1,
                ly[i],
                1.1,
                0.9,
                str(pos) if filled else "",
                fc=ORANGE_L if pos == 9 else (BLUE_L if filled else "white"),
                ec=INK,
            )
    # Block table.
    ax.text(8.0, 11.6, "block_table", fontsize=11, color=GREY)
    for i in range(3):
        cell(ax, 8.6, ly[i], 1.4, 0.9, str(table[i]), fc=GREEN_L, ec=GREEN, fs=13, weight="bold")
        ax.text(8.45, ly[i] + 0.45, f"[{i}]", ha="right", va="center", fontsize=10, color=GREY)
        arrow(ax, (5.65, ly[i] + 0.45), (7.55, ly[i] + 0.45), color=GREY)
    # Physical blocks.
    ax.text(14.0, 11.6, "KV cache of one layer: physical blocks (slot numbers)", fontsize=11, color=GREY)
    others = {0, 1, 3}
    py = {b: 10.5 - b * 1.25 for b in range(8)}
    for b in range(8):
        ax.text(23.0, py[b] + 0.45, f"#{b}", ha="left", va="center", fontsize=11, weight="bold")
        for j in range(bs):
            slot = b * bs + j
            if b in table:
                pos = table.index(b) * bs + j
                if pos < num_tokens:
                    fc, label = (ORANGE_L if pos == 9 else BLUE_L), f"pos {pos}"
                else:
                    fc, label = "white", "(empty)"
            elif b in others:
                fc, label = GREY_L, "other seq"
            else:
                fc, label = "white", "free"
            cell(
                ax,
                14.0 + j * 2.2,
                py[b],
                2.2,
                0.9,
                "",
                fc=fc,
                ec=ORANGE if slot == 21 else INK,
                lw=2.6 if slot == 21 else 1.0,
            )
            ax.text(14.08 + j * 2.2, py[b] + 0.72, str(slot), fontsize=8, color=GREY, va="center")
            if label:
                ax.text(
                    14.0 + j * 2.2 + 1.1,
                    py[b] + 0.38,
                    label,
                    ha="center",
                    va="center",
                    fontsize=10 if label.startswith("pos") else 9,
                    color=INK if label.startswith("pos") else GREY,
                )
    for i, b in enumerate(table):
        arrow(ax, (10.05, ly[i] + 0.45), (13.95, py[b] + 0.45), color=GREEN, lw=1.6)
    # The slot arithmetic for position 9.
    box(ax, 0.3, 0.35, 10.6, 4.9, "", fc="white", ec=ORANGE)
    lines = [
        ("token at position 9:", "bold"),
        ("block  = block_table[9 // 4] = block_table[2] = 5", "normal"),
        ("offset = 9 % 4 = 1", "normal"),
        ("slot   = 5 * 4 + 1 = 21", "bold"),
        ("store:  k_cache.view(-1, kv_heads, head_dim)[21] = k", "normal"),
        ("cache:  [num_blocks, block_size, kv_heads, head_dim]", "normal"),
    ]
    for k, (line, weight) in enumerate(lines):
        ax.text(
            0.6, 4.65 - k * 0.75, line, fontsize=10.5, family="DejaVu Sans Mono", weight=weight, va="center"
        )
    save(fig, "paged_attention.png")


# ---------------------------------------------------------------- (b) prefix caching


def prefix_caching() -> None:
    """Two requests share two cached blocks found through the chained hashes."""
    fig, ax = canvas(12, 7.2, 24, 14.4)
    bs = 4
    a = list(range(10))
    b = list(range(8)) + [50, 51, 52]
    ax.text(
        0.3,
        13.8,
        "prefix caching, block_size = 4: request B finds A's first two blocks",
        fontsize=13,
        weight="bold",
    )
    col = [2.0, 7.6, 13.2, 18.8]  # x of logical block i (and of the physical blocks under them)
    cw = 1.2  # width of one token cell

    def tokens_row(y, name, toks, color, color_l):
        ax.text(0.3, y + 0.45, name, fontsize=13, weight="bold", va="center", color=color)
        for i in range(3):
            chunk = toks[i * bs : (i + 1) * bs]
            for j in range(bs):
                t = chunk[j] if j < len(chunk) else None
                cell(
                    ax,
                    col[i] + j * cw,
                    y,
                    cw,
                    0.9,
                    "" if t is None else str(t),
                    fc=(color_l if t is not None else "white"),
                )

    ya, yp, yb = 11.6, 6.6, 3.6
    tokens_row(ya, "A", a, BLUE, BLUE_L)
    tokens_row(yb, "B", b, PURPLE, PURPLE_L)
    ax.text(col[0], ya + 1.2, "logical blocks 0, 1, 2 (token ids)", fontsize=10, color=GREY)
    # Physical blocks.
    phys = [
        ("#0  tokens 0-3", "h0 = xxh3(0,1,2,3)", "ref 2", GREEN_L, GREEN),
        ("#1  tokens 4-7", "h1 = xxh3(h0, 4,5,6,7)", "ref 2", GREEN_L, GREEN),
        ("#2  A: 8, 9", "partial: no hash", "ref 1", BLUE_L, BLUE),
        ("#3  B: 50, 51, 52", "partial: no hash", "ref 1", PURPLE_L, PURPLE),
    ]
    ph = 2.4
    for i, (title, h, ref, fc, ec) in enumerate(phys):
        box(ax, col[i], yp, 4.8, ph, "", fc=fc, ec=ec)
        ax.text(col[i] + 0.2, yp + 1.9, title, fontsize=11, weight="bold", va="center")
        ax.text(col[i] + 0.2, yp + 1.2, h, fontsize=9.5, va="center", family="DejaVu Sans Mono")
        ax.text(col[i] + 0.2, yp + 0.5, ref, fontsize=11, va="center", weight="bold", color=ec)
    ax.text(col[0] - 1.7, yp + ph / 2, "physical\nblocks", fontsize=10, color=GREY, va="center")
    arrow(ax, (col[0] + 4.85, yp + 1.2), (col[1] - 0.05, yp + 1.2), color=GREEN, lw=2)
    ax.text((col[0] + 4.8 + col[1]) / 2, yp + ph + 0.3, "chained", ha="center", fontsize=9.5, color=GREEN)
    mid = 2 * cw
    for i in range(3):
        arrow(ax, (col[i] + mid, ya - 0.05), (col[i] + mid, yp + ph + 0.05), color=BLUE, lw=1.5)
    for i in range(2):
        arrow(ax, (col[i] + mid, yb + 0.95), (col[i] + mid, yp - 0.05), color=PURPLE, lw=1.5)
    arrow(ax, (col[2] + 3.5 * cw, yb + 0.95), (col[3] + mid, yp - 0.05), color=PURPLE, lw=1.5)
    for k, line in enumerate(
        ["find_cached_prefix(B):", "h0 hit, h1 hit; block 2", "partial: stop. B computes", "only tokens 8-10"]
    ):
        ax.text(col[3] + 0.4, yb + 0.9 - k * 0.55, line, fontsize=10, color=PURPLE, va="center")
    # The dict and the free list.
    box(ax, 0.3, 0.2, 11.2, 2.0, "", fc="white", ec=GREEN)
    ax.text(0.6, 1.7, "hash_to_block = {h0: #0, h1: #1}", fontsize=11, family="DejaVu Sans Mono", va="center")
    ax.text(0.6, 1.1, "a hit re-checks the block's token ids", fontsize=10.5, va="center")
    ax.text(0.6, 0.55, "(a hash collision counts as a miss)", fontsize=10.5, va="center")
    box(ax, 12.1, 0.2, 11.6, 2.0, "", fc="white", ec=GREY)
    ax.text(12.4, 1.7, "ref count 0 -> back of the free list (LRU)", fontsize=11, va="center")
    ax.text(12.4, 1.1, "a freed block keeps its hash until an", fontsize=10.5, va="center")
    ax.text(12.4, 0.55, "allocation takes it from the front", fontsize=10.5, va="center")
    save(fig, "prefix_caching.png")


# ---------------------------------------------------------------- (c) one scheduler step


def scheduler_step() -> None:
    """The four steps of docs/scheduling.md (docs/examples/scheduler_timeline.py runs them)."""
    budget = 64
    steps = [  # (request, tokens, samples?) in schedule order
        [("A", 15, True), ("B", 33, True)],
        [("A", 1, True), ("B", 1, True), ("C", 62, False)],
        [("A", 1, True), ("B", 1, True), ("C", 38, True), ("D", 24, False)],
        [("A", 1, True), ("B", 1, True), ("C", 1, True), ("D", 16, True)],
    ]
    blocks = ["+1 A, +3 B", "+4 C", "+1 A, +3 C, +2 D", "+1 D"]
    free = ["32 -> 28", "28 -> 24", "24 -> 18", "18 -> 17"]
    colors = {"A": (BLUE_L, BLUE), "B": (GREEN_L, GREEN), "C": (ORANGE_L, ORANGE), "D": (PURPLE_L, PURPLE)}
    unit = 0.21  # width of one token
    fig, ax = canvas(12.5, 6.4, 25, 12.8)
    ax.text(0.2, 12.3, "token budget 64 per step, block_size 16, 32 KV blocks", fontsize=13, weight="bold")
    ax.text(
        0.2,
        11.6,
        "A (15-token prompt) and B (33) arrive before step 1, C (100) before step 2, D (40) before step 3",
        fontsize=10.5,
        color=GREY,
    )
    x0 = 2.2
    ax.text(x0 + budget * unit + 0.4, 10.75, "budget\nleft", fontsize=10, ha="left", va="center", color=GREY)
    ax.text(x0 + budget * unit + 1.9, 10.75, "blocks taken", fontsize=10, ha="left", va="center", color=GREY)
    ax.text(x0 + budget * unit + 5.6, 10.75, "free blocks", fontsize=10, ha="left", va="center", color=GREY)
    for s, row in enumerate(steps):
        y = 9.0 - s * 2.1
        if s == 2:
            ax.add_patch(Rectangle((0.05, y - 0.55), 24.85, 2.0, fc="#FFF8E5", ec=ORANGE, lw=1.2, ls="--"))
        ax.text(0.3, y + 0.45, f"step {s + 1}", fontsize=12, weight="bold", va="center")
        x = x0
        small = []
        for name, n, samples in row:
            fc, ec = colors[name]
            ax.add_patch(
                Rectangle((x, y), n * unit, 0.9, fc=fc, ec=ec, lw=1.3, hatch=None if samples else "///")
            )
            if n >= 10:
                ax.text(
                    x + n * unit / 2,
                    y + 0.45,
                    f"{name}  {n}",
                    ha="center",
                    va="center",
                    fontsize=11,
                    weight="bold",
                    bbox=dict(fc=fc, ec="none", pad=1.5) if not samples else None,
                )
            else:
                small.append((name, n, x + n * unit / 2))
            x += n * unit
        if small:
            label = "  ".join(f"{nm} {k}" for nm, k, _ in small)
            ax.text(x0, y + 1.12, label, fontsize=10, va="center", color=INK)
        used = sum(n for _, n, _ in row)
        if used < budget:
            ax.add_patch(Rectangle((x, y), (budget - used) * unit, 0.9, fc="white", ec=GREY, lw=1, ls=":"))
        ax.text(x0 + budget * unit + 0.55, y + 0.45, str(budget - used), fontsize=11, va="center")
        ax.text(x0 + budget * unit + 1.9, y + 0.45, blocks[s], fontsize=10.5, va="center")
        ax.text(x0 + budget * unit + 5.6, y + 0.45, free[s], fontsize=10.5, va="center")
    # Legend.
    ly = 1.1
    ax.add_patch(Rectangle((x0, ly), 0.9, 0.6, fc="white", ec=INK))
    ax.text(x0 + 1.1, ly + 0.3, "samples a token", fontsize=10, va="center")
    ax.add_patch(Rectangle((x0 + 4.4, ly), 0.9, 0.6, fc="white", ec=INK, hatch="///"))
    ax.text(x0 + 5.5, ly + 0.3, "prefill chunk that stops short: no sample", fontsize=10, va="center")
    ax.text(
        x0,
        0.4,
        "step 3: A and B decode, C finishes its prompt (38 tokens) and samples, D is admitted"
        " with the 24 tokens left",
        fontsize=10.5,
        va="center",
        color=ORANGE,
    )
    save(fig, "scheduler_step.png")


# ---------------------------------------------------------------- (d) decoder layer


def decoder_layer() -> None:
    """embed -> N x [norm -> attention -> +res -> norm -> MLP -> +res] -> norm -> LM head."""
    fig, ax = canvas(9.6, 13.6, 19.2, 27.2)
    x, w = 3.2, 8.6
    cx = x + w / 2
    shape_x = 13.3

    def step(y, text, fc, ec, shape="", h=1.0, fs=10.5):
        box(ax, x, y, w, h, text, fc=fc, ec=ec, fs=fs)
        if shape:
            ax.text(
                shape_x, y + h / 2, shape, fontsize=9.5, va="center", color=GREY, family="DejaVu Sans Mono"
            )

    def down(y_from, y_to):
        arrow(ax, (cx, y_from), (cx, y_to), color=INK, lw=1.3)

    pitch = 1.5
    y_ids = 25.6
    step(y_ids, "input_ids", "white", GREY, "[T]")
    y_emb = y_ids - pitch
    step(y_emb, "embed_tokens", GREY_L, GREY, "[T, H]")
    down(y_ids, y_emb + 1.0)
    items = [
        ("input_layernorm: RMSNorm", GREY_L, GREY, "[T, H]"),
        ("qkv_proj: one matmul -> q | k | v", BLUE_L, BLUE, "q [T, Hq, D]\nk, v [T, Hkv, D]"),
        ("q_norm, k_norm: RMSNorm per head (Qwen3)", BLUE_L, BLUE, ""),
        ("RoPE on q and k at their positions", BLUE_L, BLUE, ""),
        ("paged attention (GQA); new K/V -> cache", BLUE_L, BLUE, "[T, Hq, D]"),
        ("o_proj", BLUE_L, BLUE, "[T, H]"),
        ("+", "white", RED, ""),
        ("post_attention_layernorm: RMSNorm", GREY_L, GREY, "[T, H]"),
        ("gate_up_proj: one matmul -> gate | up", ORANGE_L, ORANGE, "[T, 2I]"),
        ("SiLU(gate) * up", ORANGE_L, ORANGE, "[T, I]"),
        ("down_proj", ORANGE_L, ORANGE, "[T, H]"),
        ("+", "white", RED, "[T, H]"),
    ]
    layer_top = y_emb - 0.55
    y = layer_top - 1.75
    prev = y_emb
    ys = []
    for text, fc, ec, shape in items:
        step(y, text, fc, ec, shape, fs=14 if text == "+" else 10.5)
        down(prev, y + 1.0)
        ys.append(y)
        prev = y
        y -= pitch
    layer_bottom = ys[-1] - 0.5
    ax.add_patch(
        FancyBboxPatch(
            (1.0, layer_bottom),
            11.9,
            layer_top - layer_bottom,
            boxstyle="round,pad=0,rounding_size=0.3",
            fc="none",
            ec=INK,
            lw=1.2,
            ls="--",
        )
    )
    ax.text(
        12.7, layer_top - 0.45, "DecoderLayer  x N", fontsize=11.5, weight="bold", va="center", ha="right"
    )
    # Residual paths: the layer input to the first add, the first add's output to the second.
    rail = 2.0
    for y_from, y_to in [(ys[0] + 1.25, ys[6] + 0.5), (ys[6] - 0.25, ys[11] + 0.5)]:
        ax.plot([cx, rail, rail], [y_from, y_from, y_to], color=RED, lw=1.8)
        arrow(ax, (rail, y_to), (x - 0.02, y_to), color=RED, lw=1.8)
        ax.text(
            rail - 0.2,
            (y_from + y_to) / 2,
            "residual",
            rotation=90,
            color=RED,
            fontsize=10,
            ha="right",
            va="center",
        )
    y_norm = layer_bottom - 1.6
    step(y_norm, "norm: RMSNorm", GREY_L, GREY, "[T, H]")
    down(ys[-1], y_norm + 1.0)
    y_head = y_norm - pitch
    step(y_head, "lm_head: last token of each sequence", GREEN_L, GREEN, "[num_seqs, V]")
    down(y_norm, y_head + 1.0)
    ax.text(
        0.4,
        y_head - 0.9,
        "T tokens in the step, H hidden size, Hq / Hkv query / kv heads, D head_dim,",
        fontsize=9.5,
        color=GREY,
    )
    ax.text(0.4, y_head - 1.5, "I intermediate size, V vocabulary", fontsize=9.5, color=GREY)
    save(fig, "decoder_layer.png")


# ---------------------------------------------------------------- (e) kernels


def prefill_tiling() -> None:
    """Query tiles x key tiles for one sequence of 256 keys whose first 64 are a cached prefix."""
    fig, ax = canvas(12, 7.0, 24, 14.0)
    tile = 2.2  # drawing size of 64 positions
    num_key_tiles, num_q_tiles = 4, 3
    top = 11.4
    gx, gy = 4.0, top - num_q_tiles * tile  # bottom-left of the grid
    ax.text(
        0.3,
        13.5,
        "paged prefill: one program = 64 query tokens x the 2 query heads of one kv head",
        fontsize=12.5,
        weight="bold",
    )
    ax.text(
        0.3,
        12.8,
        "seq_len 256, 192 new tokens (positions 64-255), keys 0-63 already in the cache;"
        " key tiles drawn 64 wide (the kernel steps BLOCK_N = 32 keys)",
        fontsize=10.5,
        color=GREY,
    )
    for k in range(num_key_tiles):
        ax.text(
            gx + k * tile + tile / 2, top + 0.3, f"keys {64 * k}-{64 * k + 63}", ha="center", fontsize=9.5
        )
    for qt in range(num_q_tiles):
        y = top - (qt + 1) * tile
        first = 64 + 64 * qt
        ax.text(
            gx - 0.2, y + tile / 2 + 0.3, f"tile {qt}", ha="right", va="center", fontsize=11, weight="bold"
        )
        ax.text(
            gx - 0.2, y + tile / 2 - 0.35, f"q {first}-{first + 63}", ha="right", va="center", fontsize=10
        )
        diag = qt + 1  # the key tile holding this query tile's own positions
        for k in range(num_key_tiles):
            x = gx + k * tile
            if k < diag:
                cell(ax, x, y, tile, tile, "full\n(no mask)", fc=BLUE_L, ec=BLUE, fs=9.5)
            elif k == diag:
                ax.add_patch(Rectangle((x, y), tile, tile, fc="white", ec=ORANGE, lw=1.2, hatch="xx"))
                ax.add_patch(
                    Polygon([(x, y + tile), (x, y), (x + tile, y)], closed=True, fc=ORANGE_L, ec=ORANGE)
                )
                ax.add_patch(Rectangle((x, y), tile, tile, fc="none", ec=ORANGE, lw=1.5))
                ax.text(x + tile * 0.3, y + tile * 0.3, "k <= q", ha="center", va="center", fontsize=9.5)
            else:
                cell(ax, x, y, tile, tile, "skipped", fc=GREY_L, ec=GREY, fs=9.5, color=GREY)
    below = [
        "rows of a program: BLOCK_M = 128 = 64 tokens x GROUP_P2 (2) heads,",
        "so each K/V tile is loaded once for all query heads of its kv head",
        "grid: (num_kv_heads, work items): one item per (sequence, query tile),",
        "built on the host, longest first; spare items (-1) return at once",
    ]
    for i, line in enumerate(below):
        ax.text(0.3, gy - 0.8 - i * 0.6, line, fontsize=10, va="center")
    # Legend and the online softmax on the right.
    lx = gx + num_key_tiles * tile + 0.8
    notes = [
        (BLUE_L, BLUE, None, "keys before the tile's first query:\nvisible to every row, loaded unmasked"),
        (ORANGE_L, ORANGE, "xx", "diagonal tile: causal mask k <= q\n(and k < seq_len)"),
        (GREY_L, GREY, None, "after the tile's last query:\nnever loaded"),
    ]
    for i, (fc, ec, hatch, text) in enumerate(notes):
        yy = top - 0.8 - i * 1.5
        ax.add_patch(Rectangle((lx, yy), 0.7, 0.7, fc=fc, ec=ec, hatch=hatch))
        ax.text(lx + 1.0, yy + 0.35, text, fontsize=10, va="center")
    box(ax, lx, 0.5, 23.7 - lx, 5.2, "", fc="white", ec=INK)
    formula = [
        "online softmax, per key tile and row",
        "(scores s in the log2 domain):",
        "m' = max(m, rowmax(s))",
        "l  = l * 2^(m - m') + rowsum 2^(s - m')",
        "acc = acc * 2^(m - m') + 2^(s - m') @ V",
        "m  = m'",
        "after the last tile: out = acc / l",
    ]
    for i, line in enumerate(formula):
        mono = 2 <= i <= 5
        ax.text(
            lx + 0.25,
            5.15 - i * 0.65,
            line,
            fontsize=10 if mono else 10.5,
            va="center",
            family="DejaVu Sans Mono" if mono else "DejaVu Sans",
            weight="bold" if i < 2 else "normal",
        )
    save(fig, "kernels_prefill.png")


def split_kv_decode() -> None:
    """One sequence's 1000 keys cut into 4 splits; partial outputs + LSE; the reduce."""
    fig, ax = canvas(12, 6.4, 24, 12.8)
    ax.text(
        0.3,
        12.3,
        "split-KV decode: one query token, seq_len 1000, num_splits 4",
        fontsize=12.5,
        weight="bold",
    )
    ax.text(
        0.3,
        11.55,
        "grid (batch, kv_heads, num_splits): fixed by the batch shape, not by the lengths;"
        " each program reads its range from seq_lens",
        fontsize=10.5,
        color=GREY,
    )
    x0, width, y = 1.0, 22.0, 9.2
    scale = width / 1024
    splits = [(0, 256), (256, 512), (512, 768), (768, 1000)]
    colors = [(BLUE_L, BLUE), (GREEN_L, GREEN), (ORANGE_L, ORANGE), (PURPLE_L, PURPLE)]
    for s, ((a, b), (fc, ec)) in enumerate(zip(splits, colors)):
        ax.add_patch(Rectangle((x0 + a * scale, y), (b - a) * scale, 1.1, fc=fc, ec=ec, lw=1.5))
        for t in range(a + 64, b, 64):  # 64-key tiles
            ax.plot([x0 + t * scale] * 2, [y, y + 1.1], color=ec, lw=0.7, ls=":")
        ax.text(
            x0 + (a + b) / 2 * scale,
            y + 0.55,
            f"split {s}: keys {a}-{b - 1}",
            ha="center",
            va="center",
            fontsize=10.5,
            weight="bold",
        )
    ax.text(
        x0,
        y + 1.45,
        "keys 0..999 of one kv head (dotted lines: 64-key tiles;"
        " each split = ceil(ceil(1000/4)/64) x 64 = 256 keys)",
        fontsize=10,
        color=GREY,
    )
    # Partial results.
    py = 5.6
    for s, (fc, ec) in enumerate(colors):
        bx = 1.4 + s * 5.6
        box(ax, bx, py, 4.6, 1.9, "", fc=fc, ec=ec)
        ax.text(bx + 2.3, py + 1.3, f"program (seq, kv_head, {s})", ha="center", fontsize=10)
        ax.text(
            bx + 2.3,
            py + 0.55,
            f"o_{s} = acc / l,  lse_{s}",
            ha="center",
            fontsize=11,
            family="DejaVu Sans Mono",
        )
        a, b = splits[s]
        arrow(ax, (x0 + (a + b) / 2 * scale, y - 0.05), (bx + 2.3, py + 1.95), color=ec, lw=1.4)
    # Reduce.
    ry = 1.4
    box(ax, 5.0, ry, 14.0, 2.6, "", fc="white", ec=INK, lw=1.6)
    ax.text(
        12.0,
        ry + 2.0,
        "reduce kernel, one program per (seq, query head)",
        ha="center",
        fontsize=10.5,
        weight="bold",
    )
    ax.text(
        12.0, ry + 1.2, "w_s = 2^(lse_s - max lse)", ha="center", fontsize=11.5, family="DejaVu Sans Mono"
    )
    ax.text(
        12.0, ry + 0.5, "o = sum(w_s * o_s) / sum(w_s)", ha="center", fontsize=11.5, family="DejaVu Sans Mono"
    )
    for s in range(4):
        arrow(ax, (1.4 + s * 5.6 + 2.3, py - 0.05), (7.0 + s * 3.3, ry + 2.65), color=colors[s][1], lw=1.3)
    ax.text(
        0.3,
        0.65,
        "lse_s = m_s + log2(l_s), the log of split s's softmax mass (log2 domain);"
        " an empty split writes o_s = 0, lse_s = -inf: weight 0",
        fontsize=10,
        color=GREY,
    )
    save(fig, "kernels_decode.png")


# ---------------------------------------------------------------- CUDA graphs


def cuda_graphs() -> None:
    """Capture per batch size at start-up; a decode step pads to the next captured size and replays."""
    fig, ax = canvas(12, 5.6, 24, 11.2)
    ax.text(0.3, 10.7, "decode step with 13 running sequences", fontsize=12.5, weight="bold")
    # Captured sizes.
    sizes = [1, 2, 4, 8, 16, 32, 48, 64, "...", 256]
    ax.text(0.3, 9.6, "graphs captured at start-up, one per batch size:", fontsize=10.5, color=GREY)
    for i, s in enumerate(sizes):
        hit = s == 16
        cell(
            ax,
            0.6 + i * 1.7,
            8.3,
            1.5,
            0.9,
            str(s),
            fc=ORANGE_L if hit else GREY_L,
            ec=ORANGE if hit else GREY,
            fs=11,
            weight="bold" if hit else "normal",
        )
    ax.text(17.9, 8.75, "13 -> next size 16", fontsize=11, va="center", color=ORANGE, weight="bold")
    # Static buffers.
    ax.text(0.3, 7.3, "static input buffers (device), written before replay:", fontsize=10.5, color=GREY)
    rows = ["input_ids", "positions", "slot_mapping", "seq_lens"]
    pad_value = {"input_ids": "", "positions": "", "slot_mapping": "-1", "seq_lens": "0"}
    for r, name in enumerate(rows):
        y = 6.2 - r * 1.05
        ax.text(3.4, y + 0.4, name, ha="right", va="center", fontsize=10.5, family="DejaVu Sans Mono")
        for j in range(16):
            real = j < 13
            cell(
                ax,
                3.7 + j * 1.0,
                y,
                1.0,
                0.8,
                "" if real else pad_value[name],
                fc=BLUE_L if real else ("white" if name in ("input_ids", "positions") else RED_L),
                ec=BLUE if real else GREY,
                fs=7.5,
            )
    ax.text(3.7 + 6.5, 2.15, "13 real rows", ha="center", fontsize=10.5, color=BLUE)
    ax.text(3.7 + 14.5, 2.15, "3 padding rows", ha="center", fontsize=10.5, color=RED)
    ax.text(20.0, 6.6, "stale, harmless", fontsize=10, va="center", color=GREY)
    ax.text(20.0, 5.55, "stale, harmless", fontsize=10, va="center", color=GREY)
    ax.text(20.0, 4.5, "-1: no K/V written", fontsize=10, va="center", color=RED)
    ax.text(20.0, 3.45, "0: output zeros", fontsize=10, va="center", color=RED)
    box(
        ax,
        0.3,
        0.2,
        23.4,
        1.4,
        "graph[16].replay(): every kernel of the forward in one launch;"
        " num_splits fixed per padded size, so eager and replay cut keys alike",
        fc=GREEN_L,
        ec=GREEN,
        fs=10.5,
    )
    save(fig, "cuda_graphs.png")


# ---------------------------------------------------------------- sampler


def sampler() -> None:
    """The sampler's order of operations, greedy and random rows, raw logprobs."""
    fig, ax = canvas(12.5, 5.6, 25, 11.2)
    ax.text(0.3, 10.7, "Sampler.forward: one token per row of logits [B, V]", fontsize=12.5, weight="bold")

    def stage(x, y, w, title, sub, fc, ec):
        box(ax, x, y, w, 1.9, "", fc=fc, ec=ec)
        ax.text(x + w / 2, y + 1.3, title, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(x + w / 2, y + 0.6, sub, ha="center", va="center", fontsize=9.5)

    y1 = 7.2
    stage(0.3, y1, 4.4, "logits", "fp32 copy [B, V]", GREY_L, GREY)
    stage(5.8, y1, 5.2, "bans", "min_tokens, bad_words -> -inf", RED_L, RED)
    stage(12.1, y1, 5.6, "penalties", "repetition, frequency, presence", RED_L, RED)
    stage(18.8, y1, 5.9, "greedy rows", "argmax (temperature < 1e-5)", BLUE_L, BLUE)
    arrow(ax, (4.75, y1 + 0.95), (5.75, y1 + 0.95))
    arrow(ax, (11.05, y1 + 0.95), (12.05, y1 + 0.95))
    arrow(ax, (17.75, y1 + 0.95), (18.75, y1 + 0.95))
    y2 = 3.6
    widths = [2.9, 3.5, 3.4, 3.6, 2.6]
    xs = [0.3]
    for w in widths[:-1]:
        xs.append(xs[-1] + w + 0.6)
    names = [
        ("/ temperature", "logits / T"),
        ("min-p", ">= min_p x p_max"),
        ("top-k", "k largest, ties kept"),
        ("top-p", "nucleus of mass p"),
        ("softmax", "-> p"),
    ]
    for (title, sub), x, w in zip(names, xs, widths):
        stage(x, y2, w, title, sub, ORANGE_L, ORANGE)
    for a, b, w in zip(xs, xs[1:], widths):
        arrow(ax, (a + w + 0.05, y2 + 0.95), (b - 0.05, y2 + 0.95))
    stage(19.3, y2, 5.4, "exponential race", "argmax p_i / E_i,  E_i ~ Exp(1)", PURPLE_L, PURPLE)
    arrow(ax, (xs[-1] + widths[-1] + 0.05, y2 + 0.95), (19.25, y2 + 0.95))
    # Random rows leave the penalties box downwards.
    ax.plot([14.9, 14.9, 2.1], [y1 - 0.05, 6.1, 6.1], color=INK, lw=1.5)
    arrow(ax, (2.1, 6.1), (2.1, y2 + 1.95))
    ax.text(8.5, 6.4, "random rows", ha="center", fontsize=10, color=ORANGE)
    # Seeds and logprobs.
    ax.text(19.3, y2 - 0.5, "noise from a generator seeded by", fontsize=9.5, color=PURPLE, va="center")
    ax.text(
        19.3, y2 - 1.05, "(request seed, tokens generated so far)", fontsize=9.5, color=PURPLE, va="center"
    )
    box(ax, 0.3, 0.3, 15.2, 1.7, "", fc="white", ec=GREEN)
    ax.text(
        0.6,
        1.45,
        "raw logprobs = log_softmax(logits) taken before the first stage,",
        fontsize=10.5,
        va="center",
    )
    ax.text(0.6, 0.8, "for every row when any row asks: sampled token + top-N", fontsize=10.5, va="center")
    save(fig, "sampling.png")


# ---------------------------------------------------------------- (f) architecture


def architecture() -> None:
    """The life of a request: LLM -> engine -> scheduler -> runner -> model -> sampler -> back."""
    fig, ax = canvas(13, 7.6, 26, 15.2)
    ax.text(
        0.3,
        14.6,
        "the life of a request: one engine step = schedule -> run -> update",
        fontsize=13,
        weight="bold",
    )
    # User side.
    box(ax, 0.4, 10.6, 5.2, 2.8, "", fc=GREY_L, ec=GREY)
    ax.text(3.0, 12.75, "LLM.generate", ha="center", fontsize=12, weight="bold")
    ax.text(3.0, 11.95, "prompts, SamplingParams", ha="center", fontsize=10)
    ax.text(3.0, 11.3, "steps until all finish", ha="center", fontsize=10)
    box(ax, 0.4, 1.0, 5.2, 2.8, "", fc=GREY_L, ec=GREY)
    ax.text(3.0, 3.15, "RequestOutput", ha="center", fontsize=12, weight="bold")
    ax.text(3.0, 2.35, "text, token ids, logprobs,", ha="center", fontsize=10)
    ax.text(3.0, 1.7, "finish_reason, num_cached_tokens", ha="center", fontsize=9.5)
    # Engine.
    box(ax, 7.2, 10.6, 5.6, 2.8, "", fc=BLUE_L, ec=BLUE)
    ax.text(10.0, 12.75, "LLMEngine.add_request", ha="center", fontsize=11.5, weight="bold")
    ax.text(10.0, 11.95, "tokenize, validate", ha="center", fontsize=10)
    ax.text(10.0, 11.3, "-> Sequence (WAITING)", ha="center", fontsize=10)
    box(ax, 7.2, 1.0, 5.6, 2.8, "", fc=BLUE_L, ec=BLUE)
    ax.text(10.0, 3.15, "LLMEngine.step (end)", ha="center", fontsize=11.5, weight="bold")
    ax.text(10.0, 2.35, "detokenize incrementally,", ha="center", fontsize=10)
    ax.text(10.0, 1.7, "stop strings, logprobs", ha="center", fontsize=10)
    arrow(ax, (5.65, 12.0), (7.15, 12.0))
    arrow(ax, (7.15, 2.4), (5.65, 2.4))
    # Scheduler + block manager.
    box(ax, 14.4, 9.4, 5.4, 4.0, "", fc=GREEN_L, ec=GREEN)
    ax.text(17.1, 12.75, "Scheduler.schedule", ha="center", fontsize=11.5, weight="bold")
    ax.text(17.1, 11.95, "waiting / running queues", ha="center", fontsize=10)
    ax.text(17.1, 11.3, "token budget, chunks,", ha="center", fontsize=10)
    ax.text(17.1, 10.7, "preemption", ha="center", fontsize=10)
    box(ax, 14.9, 9.65, 4.4, 0.8, "BlockManager", fc="white", ec=GREEN, fs=10)
    arrow(ax, (12.85, 12.0), (14.35, 12.0))
    ax.text(13.6, 12.3, "add", ha="center", fontsize=9.5, color=GREY)
    # Runner.
    box(ax, 21.3, 9.4, 4.4, 4.0, "", fc=ORANGE_L, ec=ORANGE)
    ax.text(23.5, 12.75, "ModelRunner", ha="center", fontsize=11.5, weight="bold")
    ax.text(23.5, 11.95, "prepare: ids, positions,", ha="center", fontsize=10)
    ax.text(23.5, 11.3, "slot_mapping,", ha="center", fontsize=10)
    ax.text(23.5, 10.7, "block_tables", ha="center", fontsize=10)
    ax.text(23.5, 10.0, "(ModelInput)", ha="center", fontsize=10)
    arrow(ax, (19.85, 11.4), (21.25, 11.4))
    ax.text(20.55, 12.15, "Scheduled\nBatch", ha="center", va="center", fontsize=8.5, color=GREY)
    # Model.
    box(ax, 21.3, 4.6, 4.4, 3.6, "", fc=ORANGE_L, ec=ORANGE)
    ax.text(23.5, 7.6, "model forward", ha="center", fontsize=11.5, weight="bold")
    ax.text(23.5, 6.85, "decoder layers,", ha="center", fontsize=10)
    ax.text(23.5, 6.2, "paged attention on", ha="center", fontsize=10)
    ax.text(23.5, 5.55, "the KV cache", ha="center", fontsize=10)
    ax.text(23.5, 4.95, "(decode: CUDA graph)", ha="center", fontsize=9.5)
    arrow(ax, (23.5, 9.35), (23.5, 8.25))
    # Sampler.
    box(ax, 21.3, 1.0, 4.4, 2.8, "", fc=PURPLE_L, ec=PURPLE)
    ax.text(23.5, 3.15, "Sampler", ha="center", fontsize=11.5, weight="bold")
    ax.text(23.5, 2.35, "logits of last tokens", ha="center", fontsize=10)
    ax.text(23.5, 1.7, "-> next token ids", ha="center", fontsize=10)
    arrow(ax, (23.5, 4.55), (23.5, 3.85))
    # Update.
    box(ax, 14.4, 1.0, 5.4, 2.8, "", fc=GREEN_L, ec=GREEN)
    ax.text(17.1, 3.15, "Scheduler.update", ha="center", fontsize=11.5, weight="bold")
    ax.text(17.1, 2.35, "advance computed tokens,", ha="center", fontsize=10)
    ax.text(17.1, 1.7, "append token, finish, free", ha="center", fontsize=10)
    arrow(ax, (21.25, 2.4), (19.85, 2.4))
    ax.text(20.55, 2.8, "tokens", ha="center", fontsize=9, color=GREY)
    arrow(ax, (14.35, 2.4), (12.85, 2.4))
    # Loop back: next step.
    arrow(ax, (17.1, 3.85), (17.1, 9.35), color=GREEN, lw=1.6, ls="--")
    ax.text(16.9, 4.9, "next step", fontsize=10, color=GREEN, va="center", ha="right")
    # The KV cache.
    box(ax, 0.4, 5.4, 12.4, 2.6, "", fc="white", ec=ORANGE, ls="--")
    kv = "KV cache [2, layers, num_blocks, block_size, kv_heads, head_dim]"
    ax.text(6.6, 7.4, kv, ha="center", fontsize=10, weight="bold")
    ax.text(6.6, 6.65, "the block manager hands out block ids (bookkeeping only);", ha="center", fontsize=10)
    ax.text(6.6, 6.0, "the model writes and reads K/V in those blocks", ha="center", fontsize=10)
    arrow(ax, (12.85, 6.7), (21.25, 6.7), color=ORANGE, style="<|-|>", lw=1.2)
    save(fig, "architecture.png")


def main() -> None:
    paged_attention()
    prefix_caching()
    scheduler_step()
    decoder_layer()
    prefill_tiling()
    split_kv_decode()
    cuda_graphs()
    sampler()
    architecture()


if __name__ == "__main__":
    main()
