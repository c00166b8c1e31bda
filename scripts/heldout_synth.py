"""A held-out-style synthetic dataset, deliberately unlike `v2t synth`, for checking that training
defaults generalise rather than fit the built-in data (README, "Training defaults").

6 shapes (hexagon and diamond among them), 7 colours, 8 motions (two diagonals), 336 captions in
another template ("橙色菱形往上走"), frame sizes from 56x56 to 160x120, PNG and JPEG frames,
coloured backgrounds. Writes train.txt (2,000 clips), val.txt (200), test.txt (200, no captions)
and test_refs.txt under DIR, 6 frames per clip.

    python scripts/heldout_synth.py DIR
"""
import base64, io, json, math, sys, os
import numpy as np
from PIL import Image, ImageDraw

SHAPES = {"circle": "圆", "square": "方块", "triangle": "三角", "star": "五角星", "diamond": "菱形", "hexagon": "六边形"}
COLOURS = {"红": (210, 30, 30), "绿": (30, 170, 50), "蓝": (40, 80, 230), "黄": (240, 220, 30),
           "紫": (140, 50, 190), "橙": (250, 140, 20), "青": (30, 200, 200)}
MOTIONS = ["向右移动", "向左移动", "往上走", "往下走", "向右上方移动", "向左下方移动", "慢慢变大", "慢慢缩小"]
SIZES = [(72, 72), (120, 90), (90, 120), (160, 120), (56, 56)]

def poly(shape, cx, cy, r):
    if shape == "square": n, off, rr = 4, math.pi / 4, r * 1.25
    elif shape == "diamond": n, off, rr = 4, 0, r * 1.2
    elif shape == "triangle": n, off, rr = 3, math.pi / 2, r * 1.15
    elif shape == "hexagon": n, off, rr = 6, 0, r
    else:
        return [(cx + q * math.cos(math.pi / 2 + k * math.pi / 5), cy - q * math.sin(math.pi / 2 + k * math.pi / 5))
                for k in range(10) for q in [r * 1.15 if k % 2 == 0 else 0.45 * r]]
    return [(cx + rr * math.cos(off + 2 * math.pi * k / n), cy - rr * math.sin(off + 2 * math.pi * k / n)) for k in range(n)]

def clip(rng, colour, shape, motion, frames=6):
    w, h = SIZES[rng.integers(len(SIZES))]
    side = min(w, h); x0, y0 = (w - side) / 2, (h - side) / 2
    r = side * rng.uniform(0.1, 0.14); travel = side * rng.uniform(0.4, 0.5)
    lo, hi = r * 1.3 + 2, side - r * 1.3 - 2
    r0 = r1 = r
    dx = {"向右移动": (1, 0), "向左移动": (-1, 0), "往上走": (0, -1), "往下走": (0, 1),
          "向右上方移动": (0.7, -0.7), "向左下方移动": (-0.7, 0.7)}.get(motion)
    if dx:
        ex, ey = dx[0] * travel, dx[1] * travel
        ax = rng.uniform(lo - min(0, ex), hi - max(0, ex)); ay = rng.uniform(lo - min(0, ey), hi - max(0, ey))
        bx, by = ax + ex, ay + ey
    else:
        small, big = side * rng.uniform(0.06, 0.08), side * rng.uniform(0.24, 0.28)
        r0, r1 = (small, big) if motion == "慢慢变大" else (big, small)
        ax = bx = side / 2 + rng.uniform(-1, 1) * (side / 2 - big * 1.3 - 2)
        ay = by = side / 2 + rng.uniform(-1, 1) * (side / 2 - big * 1.3 - 2)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255))
    bg = tuple(int(v) for v in rng.integers(60, 110, 3))
    fmt = "PNG" if rng.random() < 0.3 else "JPEG"
    out = []
    for t in range(frames):
        a = t / (frames - 1)
        px, py, pr = x0 + ax + (bx - ax) * a, y0 + ay + (by - ay) * a, r0 + (r1 - r0) * a
        im = Image.new("RGB", (w, h), bg); d = ImageDraw.Draw(im)
        if shape == "circle": d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=fill)
        else: d.polygon(poly(shape, px, py, pr), fill=fill)
        arr = np.asarray(im, np.float32) + rng.normal(0, 4, (h, w, 3))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        buf = io.BytesIO(); im.save(buf, format=fmt, **({"quality": 80} if fmt == "JPEG" else {}))
        out.append(base64.b64encode(buf.getvalue()).decode())
    return json.dumps(out)

def write(out, split, n, seed):
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "test": 2}[split]])
    combos = [(c, s, m) for s in SHAPES for c in COLOURS for m in MOTIONS]
    refs = f"{out}/{split}_refs.txt" if split == "test" else os.devnull
    with open(f"{out}/{split}.txt", "w", encoding="utf-8") as f, open(refs, "w", encoding="utf-8") as g:
        for i in range(n):
            c, s, m = combos[rng.integers(len(combos))]
            cap = f"{c}色{SHAPES[s]}{m}"
            fr = clip(rng, c, s, m)
            if split == "test":
                f.write(f"t{i}\t{fr}\n"); g.write(f"t{i}\t{cap}\n")
            else:
                f.write(f"{split}{i}\t{fr}\t{cap}\n")

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for split, n in (("train", 2000), ("val", 200), ("test", 200)):
        write(out, split, n, seed=5)
